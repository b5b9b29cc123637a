//! The Service proxy: kube-proxy-compatible iptables NAT. `model` reads Services and
//! EndpointSlices, `names` computes kube-proxy's chain names, `render` computes the ruleset as
//! data and the restore payload between two rulesets, `iptables` applies it, `healthcheck`
//! serves the health check node ports of Local load balancers.

pub mod healthcheck;
pub mod iptables;
pub mod metrics;

pub mod names;
pub mod render;
pub mod sync;
