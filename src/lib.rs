//! The rsdn node daemon and the operator's tools.

pub mod cniconf;
