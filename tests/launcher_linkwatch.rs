//! The launcher's link watch against the real kernel: a link deleted while the notification socket has
//! overflowed (its RTM_DELLINK lost) is still noticed, by re-checking the link after the overrun.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::in_netns;
use common::{Netns, require_root, unique};
use ec_ipxe_qemu::{LinkEnd, LinkWatch};

fn ifindex(ns: &Netns, name: &str) -> u32 {
    ns.link_json(name).unwrap()["ifindex"].as_u64().unwrap() as u32
}

#[test]
#[ignore = "needs root"]
fn deletion_lost_in_an_overrun_is_still_noticed() {
    require_root("deletion_lost_in_an_overrun_is_still_noticed");
    let ns = Netns::new("lw");
    let (a, _) = ns.veth(&unique("wa"), &unique("wb"));
    let index = ifindex(&ns, &a);
    let name = ns.name.clone();
    let end = in_netns(&ns.path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // A tiny receive buffer, and a runtime that does not run while the kernel sends: the buffer overflows
        // and every later notification, our link's RTM_DELLINK included, is dropped.
        let mut watch = rt.block_on(LinkWatch::subscribe_with_buffer(index, Some(1024))).unwrap();
        let mut batch = String::new();
        for i in 0..100 {
            batch.push_str(&format!("link add fl{i} type veth peer name fm{i}\n"));
        }
        batch.push_str(&format!("link del {a}\n"));
        let file = std::env::temp_dir().join(format!("{name}.batch"));
        std::fs::write(&file, batch).unwrap();
        let st = std::process::Command::new("ip").args(["-n", &name, "-batch"]).arg(&file).status().unwrap();
        let _ = std::fs::remove_file(&file);
        assert!(st.success());
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), watch.gone()).await })
    });
    assert_eq!(end, Ok(LinkEnd::Removed), "the deletion was missed");
}

/// Plain case, with other links coming and going: only our link's removal ends the watch.
#[test]
#[ignore = "needs root"]
fn other_links_do_not_end_the_watch() {
    require_root("other_links_do_not_end_the_watch");
    let ns = Netns::new("lw");
    let (a, _) = ns.veth(&unique("wa"), &unique("wb"));
    let index = ifindex(&ns, &a);
    let name = ns.name.clone();
    let ends = in_netns(&ns.path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut watch = LinkWatch::subscribe(index).await.unwrap();
            let ip = |args: &[&str]| {
                let st = tokio::process::Command::new("ip").args(["-n", &name]).args(args).status();
                async move { assert!(st.await.unwrap().success()) }
            };
            ip(&["link", "add", "ox0", "type", "veth", "peer", "name", "oy0"]).await;
            ip(&["link", "del", "ox0"]).await;
            let early = tokio::time::timeout(Duration::from_millis(500), watch.gone()).await.is_ok();
            ip(&["link", "del", &a]).await;
            let end = tokio::time::timeout(Duration::from_secs(15), watch.gone()).await;
            (early, end)
        })
    });
    assert!(!ends.0, "another link's removal ended the watch");
    assert_eq!(ends.1, Ok(LinkEnd::Removed));
}
