//! rsdn's development lab, kept out of the binary the DaemonSet image ships: the stand-in
//! Kubernetes API server, a library for the `rsdn-lab` binary and for tests of rsdn's `kube`
//! source against it. The namespace cluster itself is the binary's (`cluster.rs`).

pub mod apiserver;
