//! The netfilter engine: the one owner of everything rsdn writes into iptables. Producers
//! (the Service proxy, egress masquerade, NetworkPolicy) render rulesets as data; the engine
//! combines them, diffs them against what the kernel holds, applies the difference in one
//! `iptables-restore --noflush` transaction per sync, keeps the jumps from the built-in chains
//! in place and in order, and reads the kernel back to find and repair drift.
//!
//! - `ruleset`: tables, chains and groups as data; `payload`: the diff as restore input;
//! - `jumps`: the declarative table of jumps from built-in chains and their repair;
//! - `save`: reading iptables-save output; `verify`: drift against what was written;
//! - `backend`: which iptables the node uses; `tools`: the seam to the kernel (`Iptables`,
//!   real in `Tools`, in memory in `fake`);
//! - `engine`: the policy (full or partial, backoff, failure accounting, read back);
//! - `cleanup`: removing all of it (`rsdn cleanup`), by the same ownership.

pub mod backend;
pub mod cleanup;
pub mod engine;
pub mod fake;
pub mod jumps;
pub mod metrics;
pub mod payload;
pub mod producer;
pub mod ruleset;
pub mod save;
pub mod sets;
pub mod task;
pub mod tools;
pub mod verify;
