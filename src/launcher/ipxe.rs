//! The generated iPXE script (pure): bring up the boot NIC, DNS when given, then either a chain to the boot
//! URL (retried with a message a person understands) or the built-in diagnostics.
//!
//! The boot NIC comes up the fastest way that gives the same result as DHCP on the user-mode network:
//! - already configured (the NIC option ROM's autoboot did DHCP before it fetched this script): kept as it is,
//!   so the ROM path pays for one DHCP, not two;
//! - otherwise (`--ipxe`): the addresses slirp's DHCP server hands out, which the launcher fixes in the argv
//!   ([`layout::usernet`](crate::launcher::layout::usernet)), set directly. iPXE's DHCP waits 2 s for ProxyDHCP
//!   offers after slirp's offer (3 s in all), which this skips;
//! - `dhcp net0` with a visible retry loop when net0 cannot be opened that way.
//!
//! Every line the script prints starts with `ec-ipxe-qemu:` so it is easy to find in the serial log. The boot
//! path never DHCPs on the LAN NIC; only the diagnostics do, to show that the LAN answers.

use std::net::{IpAddr, Ipv4Addr};

use crate::launcher::config::BootTarget;
use crate::launcher::console::bootwatch::OK_LINE;
use crate::launcher::layout::NETBOOT_SCRIPT;
use crate::launcher::layout::usernet;

/// What the script needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ScriptSpec {
    /// Chain target; `None` runs the diagnostics.
    pub chain: Option<String>,
    /// DNS server for iPXE (it takes one).
    pub dns: Option<Ipv4Addr>,
    /// Whether the guest has a LAN NIC (net1).
    pub lan: bool,
    /// The host name slirp's DHCP would give (`--hostname`), set with the fixed addresses.
    pub hostname: Option<String>,
}

impl ScriptSpec {
    /// `http_port` is the port of the `--boot-dir` server, when there is one.
    pub(super) fn new(
        boot: &BootTarget,
        http_port: Option<u16>,
        dns: &[IpAddr],
        lan: bool,
        hostname: Option<&str>,
    ) -> Self {
        let chain = match boot {
            BootTarget::Diagnostics => None,
            BootTarget::Url(u) => Some(u.to_string()),
            BootTarget::Dir { bind, port, .. } => Some(dir_url(*bind, http_port.unwrap_or(*port))),
        };
        let dns = dns.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        ScriptSpec { chain, dns, lan, hostname: hostname.map(str::to_owned) }
    }
}

/// Where the guest finds the `--boot-dir` server: slirp maps 10.0.2.2 to the host's loopback, so a server on
/// loopback or on every address is reached there; one bound to a specific address is reached at that address.
pub(super) fn dir_url(bind: IpAddr, port: u16) -> String {
    let host = match bind {
        b if b.is_loopback() || b.is_unspecified() => usernet::HOST.to_string(),
        IpAddr::V4(v4) => v4.to_string(),
        // Refused by the configuration (the guest's user-mode network is IPv4); kept total for print-args.
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!("http://{host}:{port}/{NETBOOT_SCRIPT}")
}

/// The script text.
pub(super) fn script(spec: &ScriptSpec) -> String {
    let mut s = String::new();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line("#!ipxe");
    line("# Written by ec-ipxe-qemu on every start; changes here are lost.");
    match &spec.chain {
        Some(_) => line("echo ec-ipxe-qemu: boot NIC net0 (${net0/mac}) on the user-mode network"),
        None => line("echo ec-ipxe-qemu: built-in diagnostics (no --boot-url or --boot-dir was given)"),
    }
    // Configured by the NIC ROM's DHCP: no second DHCP. (A failing command ends an iPXE script unless `||`
    // handles it, so every test here is `cmd || goto`.)
    line("isset ${net0/ip} || goto ec_net0_fixed");
    line("goto ec_net0_up");
    line(":ec_net0_fixed");
    // The user-mode network's fixed addresses (what slirp's DHCP would hand out), without DHCP's waits.
    // Each step falls back to DHCP with its retry loop (e.g. no net0 when iPXE lacks a driver for the model).
    line(&format!("set net0/ip {} || goto ec_dhcp", usernet::GUEST));
    line(&format!("set net0/netmask {} || goto ec_dhcp", usernet::NETMASK));
    line(&format!("set net0/gateway {} || goto ec_dhcp", usernet::HOST));
    line(&format!("set net0/dns {} || goto ec_dhcp", usernet::DNS));
    if let Some(h) = &spec.hostname {
        line(&format!("set net0/hostname {h} || goto ec_dhcp"));
    }
    line("ifopen net0 || goto ec_dhcp");
    line("goto ec_net0_up");
    line(":ec_dhcp");
    line("inc ec_try");
    line("dhcp net0 || goto ec_dhcp_failed");
    line("goto ec_net0_up");
    line(":ec_dhcp_failed");
    line("echo ec-ipxe-qemu: no DHCP answer on net0 (the user-mode network), attempt ${ec_try}; retrying in 3 seconds");
    line("sleep 3");
    line("goto ec_dhcp");
    line(":ec_net0_up");
    if let Some(dns) = spec.dns {
        line(&format!("set dns {dns}"));
    }
    // The serial console wraps at 80 columns: keep each line short enough to grep.
    line("echo ec-ipxe-qemu: boot net0 ${net0/mac} ip ${net0/ip}");
    line("echo ec-ipxe-qemu: gateway ${net0/gateway} dns ${dns}");
    match &spec.chain {
        Some(url) => {
            line(":ec_chain");
            line(&format!("echo ec-ipxe-qemu: chaining {url}"));
            line(&format!("chain --autofree {url} || goto ec_chain_failed"));
            line(&format!(
                "echo ec-ipxe-qemu: {url} returned without starting an operating system; retrying in 10 seconds"
            ));
            line("sleep 10");
            line("goto ec_chain");
            line(":ec_chain_failed");
            // The launcher reads this line and logs the failure with the hint that fits its error number.
            line(&format!("echo ec-ipxe-qemu: could not boot from {url} (error ${{errno}}); retrying in 10 seconds"));
            line("sleep 10");
            line("goto ec_chain");
        }
        None => {
            line("ifstat");
            if spec.lan {
                line("isset ${net1/mac} || goto ec_lan_missing");
                line("echo ec-ipxe-qemu: LAN net1 mac ${net1/mac}: trying DHCP");
                line("dhcp net1 || goto ec_lan_failed");
                line("echo ec-ipxe-qemu: LAN net1 ${net1/ip}");
                line("goto ec_lan_done");
                line(":ec_lan_failed");
                line("echo ec-ipxe-qemu: LAN net1 got no DHCP answer (is there a DHCP server on the LAN?)");
                line("goto ec_lan_done");
                line(":ec_lan_missing");
                line("echo ec-ipxe-qemu: LAN NIC not visible to iPXE (no driver for its model); not tested");
                line(":ec_lan_done");
            }
            line(&format!("echo {OK_LINE}"));
            line("echo ec-ipxe-qemu: diagnostics done; idling until the launcher stops the guest");
            line(":ec_idle");
            line("sleep 3600");
            line("goto ec_idle");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_script_golden() {
        let spec = ScriptSpec {
            chain: Some("http://boot.example/netboot.ipxe".into()),
            dns: Some(Ipv4Addr::new(9, 9, 9, 9)),
            lan: true,
            hostname: Some("pub1".into()),
        };
        let s = script(&spec);
        assert_eq!(
            s,
            "#!ipxe
# Written by ec-ipxe-qemu on every start; changes here are lost.
echo ec-ipxe-qemu: boot NIC net0 (${net0/mac}) on the user-mode network
isset ${net0/ip} || goto ec_net0_fixed
goto ec_net0_up
:ec_net0_fixed
set net0/ip 10.0.2.15 || goto ec_dhcp
set net0/netmask 255.255.255.0 || goto ec_dhcp
set net0/gateway 10.0.2.2 || goto ec_dhcp
set net0/dns 10.0.2.3 || goto ec_dhcp
set net0/hostname pub1 || goto ec_dhcp
ifopen net0 || goto ec_dhcp
goto ec_net0_up
:ec_dhcp
inc ec_try
dhcp net0 || goto ec_dhcp_failed
goto ec_net0_up
:ec_dhcp_failed
echo ec-ipxe-qemu: no DHCP answer on net0 (the user-mode network), attempt ${ec_try}; retrying in 3 seconds
sleep 3
goto ec_dhcp
:ec_net0_up
set dns 9.9.9.9
echo ec-ipxe-qemu: boot net0 ${net0/mac} ip ${net0/ip}
echo ec-ipxe-qemu: gateway ${net0/gateway} dns ${dns}
:ec_chain
echo ec-ipxe-qemu: chaining http://boot.example/netboot.ipxe
chain --autofree http://boot.example/netboot.ipxe || goto ec_chain_failed
echo ec-ipxe-qemu: http://boot.example/netboot.ipxe returned without starting an operating system; retrying in 10 seconds
sleep 10
goto ec_chain
:ec_chain_failed
echo ec-ipxe-qemu: could not boot from http://boot.example/netboot.ipxe (error ${errno}); retrying in 10 seconds
sleep 10
goto ec_chain
"
        );
        // The boot path never DHCPs on the LAN NIC, even when there is one.
        assert!(!s.contains("net1"));
    }

    #[test]
    fn diagnostics_with_and_without_lan() {
        let with = script(&ScriptSpec { chain: None, dns: None, lan: true, hostname: None });
        assert!(with.starts_with("#!ipxe\n"));
        assert!(!with.contains("set dns"));
        assert!(!with.contains("chain"));
        let lan_dhcp = with.find("dhcp net1").unwrap();
        let ok = with.find(&format!("echo {OK_LINE}")).unwrap();
        assert!(with.find("dhcp net0").unwrap() < lan_dhcp && lan_dhcp < ok, "{with}");
        // net0 comes up before anything touches net1, and no net1 setting is ever written.
        assert!(with.find(":ec_net0_up").unwrap() < with.find("net1").unwrap(), "{with}");
        assert!(!with.contains("set net1") && !with.contains("ifopen net1") && !with.contains("hostname"), "{with}");
        // A failing command ends an iPXE script: no `&&` whose left side may fail.
        assert!(!with.contains("&&"), "{with}");
        assert!(with.contains("echo ec-ipxe-qemu: LAN net1 ${net1/ip}\n"));
        assert!(with.contains("ifstat\n"));
        let without = script(&ScriptSpec { chain: None, dns: None, lan: false, hostname: None });
        assert!(!without.contains("net1"));
        assert!(without.contains(&format!("echo {OK_LINE}\n")));
    }

    #[test]
    fn spec_from_target() {
        use crate::launcher::config::BootTarget;
        let dns = ["2001:db8::1".parse().unwrap(), "1.1.1.1".parse().unwrap(), "8.8.8.8".parse().unwrap()];
        let s = ScriptSpec::new(&BootTarget::Diagnostics, None, &dns, false, Some("pub1"));
        assert_eq!(s.dns, Some(Ipv4Addr::new(1, 1, 1, 1)));
        assert_eq!(s.hostname.as_deref(), Some("pub1"));
        let d = BootTarget::Dir { dir: "/srv".into(), bind: "127.0.0.1".parse().unwrap(), port: 0 };
        assert_eq!(
            ScriptSpec::new(&d, Some(4242), &[], false, None).chain.unwrap(),
            "http://10.0.2.2:4242/netboot.ipxe"
        );
        assert_eq!(dir_url("0.0.0.0".parse().unwrap(), 80), "http://10.0.2.2:80/netboot.ipxe");
        assert_eq!(dir_url("192.168.1.5".parse().unwrap(), 80), "http://192.168.1.5:80/netboot.ipxe");
    }
}
