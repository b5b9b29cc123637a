//! What a kube-rs store of 5000 pods holds, as the API server serves them, as k8s-openapi Pods
//! emptied of all but the kept fields, and as the `kube` source keeps them (`SlimPod`): live
//! heap bytes counted by this test binary's allocator (one test, so nothing else allocates).
//! The pods are `src/source/testdata/pod.json` (a two-container Deployment pod with
//! managedFields, env, probes, volumes and statuses), 5000 times with their own name, uid,
//! address, node and Deployment. `cargo test --test pod_store_memory -- --nocapture` prints
//! the figures; the test fails if slimming stops paying.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use rsdn::source::slim::SlimPod;
use serde_json::{json, Value};

/// Counts the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: usize = 5000;

/// Pod `i` as JSON text, the way it comes over the wire.
fn pod_json(template: &Value, i: usize) -> String {
    let mut p = template.clone();
    let deployment = format!("svc{:02}", i % 50);
    let hash = format!("{:010x}", i % 50 * 7919);
    let meta = &mut p["metadata"];
    meta["name"] = json!(format!("{deployment}-{hash}-{i:05}"));
    meta["generateName"] = json!(format!("{deployment}-{hash}-"));
    meta["namespace"] = json!(format!("team{}", i % 20));
    meta["uid"] = json!(format!("5d0c2f8e-7a41-4b9e-8d2c-{i:012}"));
    meta["resourceVersion"] = json!(format!("{}", 48_000_000 + i));
    meta["labels"]["app.kubernetes.io/name"] = json!(deployment);
    meta["labels"]["pod-template-hash"] = json!(hash);
    meta["ownerReferences"][0]["name"] = json!(format!("{deployment}-{hash}"));
    let ip = format!("10.{}.{}.{}", 128 + i / 65536, (i / 256) % 256, i % 256);
    p["spec"]["nodeName"] = json!(format!("worker-{}", i % 100));
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{ "ip": ip }]);
    p.to_string()
}

/// Live heap bytes of a store of every pod, each parsed from JSON text as `K` and passed
/// through `trim` on its way in (as `watcher(..).modify(trim).reflect(writer)` does).
fn store_bytes<K>(texts: &[String], trim: fn(&mut K)) -> (isize, Store<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
{
    let before = LIVE.load(Ordering::SeqCst);
    let (store, mut writer) = reflector::store::<K>();
    for t in texts {
        let mut o: K = serde_json::from_str(t).unwrap();
        trim(&mut o);
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    drop(writer);
    (LIVE.load(Ordering::SeqCst) - before, store)
}

#[test]
fn a_store_of_slim_pods_is_a_fraction_of_one_of_full_pods() {
    let template: Value =
        serde_json::from_str(include_str!("../src/source/testdata/pod.json")).unwrap();
    let texts: Vec<String> = (0..PODS).map(|i| pod_json(&template, i)).collect();
    let wire: usize = texts.iter().map(String::len).sum();

    let (full, store) = store_bytes::<Pod>(&texts, |_| {});
    assert_eq!(store.len(), PODS);
    drop(store);
    // The other way: parse whole Pods and cut them down (what `SlimPod::to_pod` gives).
    let (trimmed, store) = store_bytes::<Pod>(&texts, |p| {
        let text = serde_json::to_string(p).unwrap();
        *p = serde_json::from_str::<SlimPod>(&text).unwrap().to_pod();
    });
    assert_eq!(store.len(), PODS);
    drop(store);
    let (slim, store) = store_bytes::<SlimPod>(&texts, |_| {});
    assert_eq!(store.len(), PODS);

    let kib = |b: isize| b as f64 / 1024.0;
    let per = |b: isize| b as f64 / PODS as f64;
    println!(
        "{PODS} pods, {:.0} KiB of JSON; live heap of a kube-rs store of them:\n  \
         full Pods {:.0} KiB ({:.0} B/pod)\n  \
         Pods with the dropped fields cut (modify) {:.0} KiB ({:.0} B/pod)\n  \
         SlimPods {:.0} KiB ({:.0} B/pod): {:.1}x smaller than full",
        kib(wire as isize),
        kib(full),
        per(full),
        kib(trimmed),
        per(trimmed),
        kib(slim),
        per(slim),
        full as f64 / slim as f64
    );
    println!(
        "inline sizes: Pod {} B, Container {} B, SlimPod {} B, SlimContainer {} B",
        std::mem::size_of::<Pod>(),
        std::mem::size_of::<k8s_openapi::api::core::v1::Container>(),
        std::mem::size_of::<SlimPod>(),
        std::mem::size_of::<rsdn::source::slim::SlimContainer>(),
    );
    // For scale: the model's share of the same pods (what `ModelBuilder` makes of them).
    let before = LIVE.load(Ordering::SeqCst);
    let mut b = rsdn::model::ModelBuilder::default();
    for p in store.state() {
        b.add_pod(&p.to_pod());
    }
    let model = b.finish(&rsdn::model::ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "worker-0".into(),
        programmed: Default::default(),
    });
    let in_model = LIVE.load(Ordering::SeqCst) - before;
    assert_eq!(model.pods.len(), PODS);
    println!(
        "the model's pods: {:.0} KiB ({:.0} B/pod)",
        kib(in_model),
        per(in_model)
    );
    assert!(slim * 10 < full, "slim {slim} B vs full {full} B");
    assert!(slim * 2 < trimmed, "slim {slim} B vs trimmed {trimmed} B");
}
