# The shared part of the module-eval test (./default.nix): the real NixOS evaluation of
# ../nixos.nix, the check helpers, and the configurations several parts of the test look at.
{
  nixpkgs,
  systemdVersion,
}:

let
  nixos = import ../nixos.nix { inherit nixpkgs systemdVersion; };
  inherit (nixos) lib;

  fakePkgs = nixos.pkgs;
  ec = fakePkgs.ec-ipxe-qemu.outPath;
  qemu = fakePkgs.qemu_kvm.outPath;
  ipxe = fakePkgs.ipxe.outPath;
  netbootDir = "/nix/store/44444444444444444444444444444444-ec-publisher-netboot";

  evalConfig = modules: (nixos.eval ([ ../../modules/ec-ipxe-qemu.nix ] ++ modules)).config;

  opt = [
    "services"
    "every-channel"
    "ipxe-qemu"
  ];
  enabled = lib.setAttrByPath opt { enable = true; };
  with' = attrs: lib.setAttrByPath opt attrs;

  # The settings of each networkd .network (forcing the whole submodule would hit its
  # deprecated-option throws).
  networksOf =
    config:
    lib.mapAttrs (_: n: {
      inherit (n) matchConfig linkConfig;
    }) config.systemd.network.networks;

  unitOf = config: config.systemd.services.every-channel-ipxe-qemu;
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  show = v: if builtins.isString v then v else builtins.toJSON v;
  fail = name: msg: throw "module-eval FAILED: ${name}: ${msg}";
  expectEq =
    name: expected: actual:
    if expected == actual then
      name
    else
      fail name "\n  expected: ${show expected}\n  actual:   ${show actual}";
  expect =
    name: cond: msg:
    if cond then name else fail name msg;

  # The host's DHCP clients and network managers keep their hands off the macvtap `name`, and
  # nothing else of theirs is touched (`name` null: no LAN, nothing at all).
  hostNetworkingChecks =
    label: config: name:
    let
      at = path: lib.attrByPath path [ ] config;
    in
    [
      (expectEq "${label}: dhcpcd denyInterfaces" (lib.optional (name != null) name) (at [
        "networking"
        "dhcpcd"
        "denyInterfaces"
      ]))
      (expectEq "${label}: networkd networks" (lib.optionalAttrs (name != null) {
        "05-every-channel-macvtap" = {
          matchConfig.Name = name;
          linkConfig.Unmanaged = true;
        };
      }) (networksOf config))
      (expectEq "${label}: NetworkManager unmanaged"
        (lib.optional (name != null) "interface-name:${name}")
        (at [
          "networking"
          "networkmanager"
          "unmanaged"
        ])
      )
    ];

  disabledConfig = evalConfig [ ];
  defaultUnit = unitOf (evalConfig [ enabled ]);
  # the default unit's serviceConfig
  sc = defaultUnit.serviceConfig;

  withCredentials =
    credentials:
    with' {
      enable = true;
      inherit credentials;
    };

  # ---------------------------------------------------------------- configurations
  # the examples, and two hand-written ones with everything the command line escapes
  forge = evalConfig [ ../../examples/forge-host.nix ];
  lanDerived = evalConfig [ ../../examples/lan-host.nix ];
  lanExplicit = evalConfig [
    ../../examples/lan-host.nix
    (with' {
      lan.macvtap = {
        interface = lib.mkForce "eth1";
        name = "ec-tuners";
        mode = "private";
        macAddress = "52:54:00:EC:00:01";
        queues = 2;
      };
      lan.model = "virtio-net-pci";
      lan.vhost = "on";
      disk.path = "/srv/ec/publisher.qcow2";
      boot.url = "https://boot.example.org/ec/netboot.ipxe?mac=\${net0/mac}&x=100%";
    })
  ];
  httpExtra = evalConfig [
    (with' {
      enable = true;
      stateDir = "/srv/ec-guest";
      memory = 256;
      cpus = 1;
      accel = "tcg";
      disk.enable = false;
      boot.ipxePackage = null;
      boot.http = {
        enable = true;
        directory = netbootDir;
        bindAddress = "127.0.0.1";
        port = 8080;
      };
      boot.userNet = {
        dnsServers = [
          "9.9.9.9"
          "149.112.112.112"
        ];
        model = "e1000";
        hostForwards = [
          "tcp::2222-:22"
          "udp:127.0.0.1:5353-:53"
        ];
      };
      extraArgs = [
        "-smbios"
        "type=11,value=io.systemd.credential:motd=it's \"quoted\", 100% $HOME \${HOME} back\\slash; semi"
        "-device"
        "virtio-rng-pci"
        ""
      ];
    })
  ];

  # ---------------------------------------------------------------- rendered unit text
  # What NixOS writes to /etc/systemd/system, from the real systemd-lib.nix.
  textOf = config: config.systemd.units."every-channel-ipxe-qemu.service".text;
  linesOf = text: lib.filter (l: l != "") (lib.splitString "\n" text);
  # The lines of one [Section] of a unit file.
  sectionOf =
    name: text:
    let
      go =
        acc: l:
        if lib.hasPrefix "[" l then
          acc // { current = l; }
        else if acc.current == "[${name}]" then
          acc // { lines = acc.lines ++ [ l ]; }
        else
          acc;
    in
    (lib.foldl' go {
      current = null;
      lines = [ ];
    } (linesOf text)).lines;

  # The Nix mirrors of the launcher's parsers (a pure { lib } file).
  validate = import ../../lib/validate.nix { inherit lib; };
in
{
  inherit
    nixos
    lib
    fakePkgs
    ec
    qemu
    ipxe
    netbootDir
    evalConfig
    opt
    enabled
    with'
    networksOf
    hostNetworkingChecks
    unitOf
    failedAssertions
    expectEq
    expect
    disabledConfig
    defaultUnit
    sc
    withCredentials
    forge
    lanDerived
    lanExplicit
    httpExtra
    textOf
    linesOf
    sectionOf
    validate
    ;
}
