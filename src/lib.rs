//! The rsdn node daemon and the operator's tools.

pub mod build_info;
pub mod cleanup;
pub mod cniconf;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod egress;
pub mod health;
pub mod http;
pub mod install;
pub mod logging;
pub mod model;
pub mod netfilter;
pub mod node_status;
pub mod overlay;
pub mod policy;
pub mod proxy;
pub mod source;
pub mod trace;
pub mod tunnel;
