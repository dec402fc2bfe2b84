# The two commands the README documents. Both install what they need (as root, on Debian/Ubuntu).
.PHONY: demo test bench build

# Main job on an embedded default: a throwaway lab (netns, veth, dnsmasq), a macvtap made by ec-macvtap,
# and ec-ipxe-qemu running the built-in diagnostics under TCG. No real LAN is touched.
demo:
	scripts/demo.sh

# The whole test suite (what CI runs).
test:
	scripts/test.sh

bench:
	cargo bench --bench macvtap
	cargo bench --bench launcher
	cargo bench --bench boot
	cargo bench --bench flood

build:
	cargo build --release
