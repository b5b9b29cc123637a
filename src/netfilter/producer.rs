//! Producers of rulesets: the Service proxy, egress masquerade, NetworkPolicy. Each renders its
//! chains from the cluster model; the engine writes them together.

use std::sync::Arc;

use tracing::error;

use super::engine::{Desired, SyncReport};
use super::jumps::Jump;
use super::ruleset::{Ruleset, TableName};
use crate::model::ClusterModel;

/// Whether a chain is a producer's (by its name).
pub type Owner = fn(TableName, &str) -> bool;

pub trait Producer: Send {
    fn name(&self) -> &'static str;
    /// This producer's chains for `model`. Cheap when little changed: producers cache.
    fn render(&mut self, model: &Arc<ClusterModel>) -> Ruleset;
    /// Whether what it rendered last is out of date for a reason the model does not show (the
    /// host's addresses changed): asked on every resync tick, so cheap.
    fn stale(&mut self) -> bool {
        false
    }
    /// Its jumps from the built-in chains, in the order they must stand.
    fn jumps(&self) -> Vec<Jump>;
    /// Which chains are its own: stale ones found in the kernel are deleted.
    fn owner(&self) -> Owner;
    /// The kernel now holds what `render` returned for `model`.
    fn synced(&mut self, _model: &Arc<ClusterModel>, _report: &SyncReport) {}
    /// Rules had gone missing from the kernel (a flush, a jump or a chain deleted by hand) and
    /// were put back: what went through the gap may need cleaning up.
    fn repaired(&mut self, _model: &Arc<ClusterModel>) {}
    /// A look at the kernel's packet counters (every read back round): `packets(table, chain)`
    /// gives a chain's rules' counters.
    fn counters(&mut self, _packets: &dyn Fn(TableName, &str) -> Option<Vec<u64>>) {}
}

/// What every producer renders for `model`, together. Producers come in the order their jumps
/// must stand in a built-in chain they share (NetworkPolicy before the proxy's forwarding
/// rules, for example). A chain two producers both render is a bug: logged, the first kept.
pub fn combine(producers: &mut [Box<dyn Producer>], model: &Arc<ClusterModel>) -> Desired {
    let started = std::time::Instant::now();
    let mut ruleset = Ruleset::default();
    let mut jumps = Vec::new();
    let mut owners: Vec<Owner> = Vec::new();
    for p in producers.iter_mut() {
        if let Err(clash) = ruleset.absorb(p.render(model)) {
            error!(producer = p.name(), error = %clash, "rulesets overlap");
        }
        jumps.extend(p.jumps());
        owners.push(p.owner());
    }
    Desired {
        ruleset,
        jumps,
        owned: Arc::new(move |t, c| owners.iter().any(|own| own(t, c))),
        rendered_in: started.elapsed(),
    }
}
