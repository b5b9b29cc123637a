//! Cluster sources: where the model of the cluster comes from.

pub mod dir;
