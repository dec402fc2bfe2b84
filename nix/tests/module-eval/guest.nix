# Module-eval, part 8: the guest module nix/modules/ec-publisher-guest.nix: its .link and
# .network files, services, disk, console and firewall. `units` and `scripts` are what
# ./default.nix hands to systemd-analyze.
{
  nixos,
  lib,
  failedAssertions,
  expectEq,
  expect,
  sectionOf,
  ...
}:

let
  guestEval =
    modules:
    (nixos.eval (
      [
        ../../modules/ec-publisher-guest.nix
      ]
      ++ modules
    )).config;
  guestOn = extra: {
    every-channel.publisherGuest = {
      enable = true;
    }
    // extra;
  };
  guest = guestEval [
    (guestOn {
      dataDisk.enable = true;
      sshAuthorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly admin@forge" ];
    })
  ];
  guestMinimal = guestEval [ (guestOn { tunerDiscovery.enable = false; }) ];
  guestOff = guestEval [ ];
  netUnit = config: name: config.systemd.network.units.${name}.text;
  guestService = config: name: config.systemd.units."${name}.service".text;
  sectionHas =
    name: section: line: text:
    expect "guest ${name}: [${section}] has ${line}" (lib.elem line (
      sectionOf section text
    )) "missing in:\n${text}";
  guestRejects =
    what: def:
    expect "guest type rejects ${what}" (
      !(builtins.tryEval (
        builtins.deepSeq (guestEval [ (guestOn def) ]).every-channel.publisherGuest true
      )).success
    ) "the definition was accepted";
  # The ready unit of a guest that expects two credentials.
  readyWithCredentials = guestService (guestEval [
    (guestOn {
      credentials = [
        "mesh-key"
        "ec.tuners"
      ];
    })
  ]) "every-channel-publisher-ready";
  guestChecks = [
    (expectEq "guest assertions" [ ] (failedAssertions guest))
    (sectionHas "10-ec-boot0.link" "Match" "Path=pci-0000:00:03.0" (netUnit guest "10-ec-boot0.link"))
    (sectionHas "10-ec-boot0.link" "Link" "Name=boot0" (netUnit guest "10-ec-boot0.link"))
    (sectionHas "10-ec-lan0.link" "Match" "Path=pci-0000:00:04.0" (netUnit guest "10-ec-lan0.link"))
    (sectionHas "10-ec-lan0.link" "Link" "Name=lan0" (netUnit guest "10-ec-lan0.link"))
    (sectionHas "10-ec-boot0.network" "Match" "Name=boot0" (netUnit guest "10-ec-boot0.network"))
    (sectionHas "10-ec-boot0.network" "Network" "DHCP=yes" (netUnit guest "10-ec-boot0.network"))
    (sectionHas "10-ec-boot0.network" "DHCPv4" "RouteMetric=100" (netUnit guest "10-ec-boot0.network"))
    (sectionHas "10-ec-boot0.network" "Link" "RequiredForOnline=routable" (
      netUnit guest "10-ec-boot0.network"
    ))
    (sectionHas "10-ec-lan0.network" "Network" "DHCP=ipv4" (netUnit guest "10-ec-lan0.network"))
    (sectionHas "10-ec-lan0.network" "Network" "LinkLocalAddressing=no" (
      netUnit guest "10-ec-lan0.network"
    ))
    (sectionHas "10-ec-lan0.network" "DHCPv4" "RouteMetric=1024" (netUnit guest "10-ec-lan0.network"))
    (sectionHas "10-ec-lan0.network" "Link" "RequiredForOnline=no" (netUnit guest "10-ec-lan0.network"))
    (sectionHas "tuner discovery" "Service" "Type=oneshot" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Service" "StandardOutput=journal+console" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Service" "DynamicUser=true" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Unit" "Wants=network-online.target" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Install" "WantedBy=multi-user.target" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "ready line" "Unit" "After=multi-user.target" (
      guestService guest "every-channel-publisher-ready"
    ))
    (sectionHas "ready line" "Install" "WantedBy=multi-user.target" (
      guestService guest "every-channel-publisher-ready"
    ))
    (sectionHas "ready line" "Service" "StandardOutput=tty" (
      guestService guest "every-channel-publisher-ready"
    ))
    (sectionHas "ready line" "Service" "TTYPath=/dev/ttyS0" (
      guestService guest "every-channel-publisher-ready"
    ))
    (
      let
        text = guest.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text;
        lan = lib.strings.splitString "ec-publisher: lan " text;
        ready = lib.strings.splitString "ec-publisher: ready" text;
      in
      expect "guest ready script prints the LAN address before the ready line" (
        builtins.length lan == 2
        && builtins.length ready == 2
        && lib.hasInfix "ec-publisher: ready" (builtins.elemAt lan 1)
      ) text
    )
    (expect "guest ready and discovery units run the files the Debian test guest runs" (
      lib.hasSuffix (builtins.readFile ../../guest/ec-publisher-ready.sh) guest.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text
      && lib.hasSuffix (builtins.readFile ../../guest/ec-publisher-discover.sh) guest.systemd.services.every-channel-tuner-discovery.serviceConfig.ExecStart.text
      && lib.hasInfix "EC_TUNER_ATTEMPTS=12\n" guest.systemd.services.every-channel-tuner-discovery.serviceConfig.ExecStart.text
    ) "nix/guest/*.sh is not what the units run")
    (expect "guest ready line also without LAN or tuner discovery" (
      guestMinimal.systemd.units ? "every-channel-publisher-ready.service"
    ) "unit missing")
    (sectionHas "data disk format" "Unit" "DefaultDependencies=false" (
      guestService guest "every-channel-data-disk-format"
    ))
    (sectionHas "data disk format" "Unit" "Requires=dev-vda.device" (
      guestService guest "every-channel-data-disk-format"
    ))
    (expectEq "guest data disk mount" {
      device = "/dev/vda";
      fsType = "ext4";
      options = [
        "nofail"
        "x-systemd.requires=every-channel-data-disk-format.service"
        "x-systemd.device-timeout=60s"
      ];
    } guest.fileSystems."/var/lib/every-channel")
    (expectEq "guest serial console" [
      "console=tty0"
      "console=ttyS0,115200n8"
    ] guest.boot.kernelParams)
    (expect "guest initrd has the virtio drivers" (lib.all
      (m: lib.elem m guest.boot.initrd.availableKernelModules)
      [
        "virtio_pci"
        "virtio_net"
        "virtio_blk"
      ]
    ) "missing in ${builtins.toJSON guest.boot.initrd.availableKernelModules}")
    (expectEq "guest ssh is key-only" false guest.services.openssh.settings.PasswordAuthentication)
    (expectEq "guest firewall lets tuner replies in on lan0"
      "iptables -w -I nixos-fw -i lan0 -p udp --sport 65001 -j nixos-fw-accept"
      guest.networking.firewall.extraCommands
    )
    (expectEq "guest firewall (nftables)" ''iifname "lan0" udp sport 65001 accept''
      (guestEval [
        (guestOn { })
        { networking.nftables.enable = true; }
      ]).networking.firewall.extraInputRules
    )
    (expect "guest without tuner discovery has no discovery unit" (
      !(guestMinimal.systemd.units ? "every-channel-tuner-discovery.service")
    ) "unit present")
    (expect "guest without data disk has no format unit" (
      !(guestMinimal.systemd.units ? "every-channel-data-disk-format.service")
    ) "unit present")
    (expectEq "guest without ssh keys leaves openssh alone" { } guestMinimal.services.openssh)
    (expect "guest disabled: no units, links or networks" (
      !(guestOff.systemd.units ? "every-channel-tuner-discovery.service")
      && guestOff.systemd.network.units == { }
    ) "something is defined although enable = false")
    (guestRejects "dataDisk.device = \"vda\"" { dataDisk.device = "vda"; })
    (guestRejects "dataDisk.label longer than 16" { dataDisk.label = "a-label-far-too-long"; })
    (guestRejects "dataDisk.mountPoint relative" { dataDisk.mountPoint = "var/lib/ec"; })
    (guestRejects "tunerDiscovery.attempts = 0" { tunerDiscovery.attempts = 0; })
    # Credentials: the ready unit imports the expected ones and its script lists them before
    # the ready line; the discovery unit imports the static tuner list.
    (
      let
        g = guestEval [
          (guestOn {
            credentials = [
              "mesh-key"
              "ec.tuners"
              (lib.concatStrings (lib.replicate 28 "a"))
            ];
          })
        ];
        text = g.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text;
      in
      expect "guest ready script gets the expected credentials, one per line"
        (lib.hasInfix "EC_CREDENTIALS='mesh-key\nec.tuners\n${lib.concatStrings (lib.replicate 28 "a")}'\n" text)
        text
    )
  ]
  ++
    map
      (
        name:
        sectionHas "ready line with credentials" "Service" "ImportCredential=${name}" readyWithCredentials
      )
      [
        "mesh-key"
        "ec.tuners"
      ]
  ++ [
    (expect "guest ready unit without credentials imports none" (
      !(lib.hasInfix "ImportCredential" (guestService guest "every-channel-publisher-ready"))
      && lib.hasInfix "EC_CREDENTIALS=''\n" guest.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text
    ) (guestService guest "every-channel-publisher-ready"))
    (sectionHas "tuner discovery" "Service" "ImportCredential=ec.tuners" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (
      let
        text = guest.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text;
        parts = lib.strings.splitString "ec-publisher: credentials" text;
      in
      expect "guest ready script prints the credentials line before the LAN and ready lines" (
        builtins.length parts == 2
        && lib.hasInfix "ec-publisher: lan " (builtins.elemAt parts 1)
        && lib.hasInfix "ec-publisher: ready" (builtins.elemAt parts 1)
      ) text
    )
    (guestRejects "credentials name with '/'" { credentials = [ "a/b" ]; })
    (guestRejects "credentials name with ':'" { credentials = [ "a:b" ]; })
    (guestRejects "credentials name \".\"" { credentials = [ "." ]; })
    (guestRejects "credentials name \"..\"" { credentials = [ ".." ]; })
    (guestRejects "credentials name empty" { credentials = [ "" ]; })
    (guestRejects "credentials name with a space" { credentials = [ "a b" ]; })
    (guestRejects "credentials name with a glob" { credentials = [ "a*" ]; })
    (guestRejects "credentials name with '%'" { credentials = [ "a%i" ]; })
    (guestRejects "credentials name of 29 bytes" {
      credentials = [ (lib.concatStrings (lib.replicate 29 "a")) ];
    })
  ];

  # For systemd-analyze: the guest's unit and networkd files, and the scripts its services run.
  guestUnits =
    lib.mapAttrs (_: u: u.text) (
      lib.filterAttrs (n: _: lib.hasPrefix "every-channel-" n) guest.systemd.units
    )
    // lib.mapAttrs (_: u: u.text) guest.systemd.network.units;
  scripts = lib.listToAttrs (
    map (
      name:
      let
        exec = guest.systemd.services.${name}.serviceConfig.ExecStart;
      in
      lib.nameValuePair exec.outPath exec.text
    ) (lib.attrNames (lib.filterAttrs (n: _: lib.hasPrefix "every-channel-" n) guest.systemd.services))
  );
in
{
  inherit guestChecks scripts;
  units = guestUnits;
}
