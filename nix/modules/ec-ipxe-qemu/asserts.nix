# Evaluation-time checks of services.every-channel.ipxe-qemu (imported by
# ../ec-ipxe-qemu.nix). A value that `ec-ipxe-qemu run` or `ec-macvtap` would refuse (exit 2,
# which the unit does not restart) fails `nixos-rebuild` here instead, with a message that
# starts with the option's full name (`opt.*`), says what is wrong and what to set. The
# rules themselves live in ../../lib/validate.nix.
{
  config,
  lib,
  options,
  ...
}:

let
  cfg = config.services.every-channel.ipxe-qemu;
  opt = options.services.every-channel.ipxe-qemu;
  validate = import ../../lib/validate.nix { inherit lib; };

  show = builtins.toJSON;
  # Messages are written wrapped; they are shown as one line each.
  oneLine = text: lib.concatStringsSep " " (lib.filter (l: l != "") (lib.splitString "\n" text));

  # One assertion from a `validate.*Problem` result: "OPTION = VALUE PROBLEM. HINT".
  problem = option: value: why: hint: {
    assertion = why == null;
    message = "${option} = ${show value} ${toString why}. ${hint}";
  };
  # One assertion per refused element of a list option.
  each =
    option: values: ok: rule:
    map (v: {
      assertion = ok v;
      message = "${option} = ${show v}: ${rule}";
    }) values;

  lanModel = if cfg.lan.model == null then "virtio-net-pci" else cfg.lan.model;
  lanParent = cfg.lan.macvtap.interface;
  mac = cfg.lan.macvtap.macAddress;
  diskOutsideState = cfg.disk.enable && !(lib.hasPrefix "${cfg.stateDir}/" cfg.disk.path);
  # credentials.<name>: the option path of one entry, quoted as Nix would need it.
  credential = name: "${opt.credentials}.${lib.strings.escapeNixIdentifier name}";
  inStore = path: path == builtins.storeDir || lib.hasPrefix "${builtins.storeDir}/" path;
  credentialChecks =
    name: c:
    let
      nameProblem = validate.loadCredentialNameProblem name;
    in
    [
      {
        assertion = nameProblem == null;
        message = ''
          ${credential name}: the credential name ${toString nameProblem}. Use printable ASCII
          without '/', ':', '%' or a backslash, not "." or "..", at most
          ${toString validate.credentialNameMax} bytes (QEMU's fw_cfg name
          opt/io.systemd.credentials/NAME), e.g. "ec.tuners".
        '';
      }
      {
        assertion = !(c.secret && inStore c.file);
        message = ''
          ${credential name}.file = ${show c.file} is in the Nix store, which every local
          user can read. Keep the secret outside the store (for example in /run/keys, written
          by sops-nix or agenix), or set ${credential name}.secret = false if it is not secret.
        '';
      }
    ];
  nicModelHint = ''use a QEMU device name like "virtio-net-pci" or "e1000"'';
in
{
  config = lib.mkIf cfg.enable {
    assertions = map (a: a // { message = oneLine a.message; }) (
      [
        (problem opt.stateDir cfg.stateDir (validate.stateDirProblem cfg.stateDir) ''
          Use a short directory of its own written plainly, for example
          "/var/lib/every-channel/ipxe-qemu" (the unit owns it: tmpfiles gives it to the service
          user and ReadWritePaths= opens it).
        '')
        (problem opt.disk.path cfg.disk.path
          (
            if !cfg.disk.enable then
              null
            else if diskOutsideState then
              validate.diskPathProblem cfg.disk.path
            else
              validate.pathProblem cfg.disk.path
          )
          ''
            Use a file path in a directory of its own or inside stateDir, such as
            "/var/lib/every-channel/ipxe-qemu/disk.qcow2".
          ''
        )
        (problem opt.boot.readyPattern cfg.boot.readyPattern
          (if cfg.boot.readyPattern == null then null else validate.readyPatternProblem cfg.boot.readyPattern)
          ''
            Give a regular expression for the console line that means the guest is up, e.g.
            "^login: ?$", or null for the launcher's default.
          ''
        )
        (problem opt.boot.url cfg.boot.url (
          if cfg.boot.url == null then null else validate.bootUrlProblem cfg.boot.url
        ) "The launcher takes http://, https:// or tftp://HOST[:PORT]/PATH.")
        {
          assertion = cfg.boot.cache.caFiles == [ ] || (cfg.boot.url != null && cfg.boot.cache.enable);
          message = ''
            ${opt.boot.cache.caFiles} is set, but the boot cache is off (it needs ${opt.boot.url}
            and ${opt.boot.cache.enable} = true). Remove the CA files or turn the cache on.
          '';
        }
        {
          assertion = cfg.boot.http.bindAddress == null || validate.isIPv4 cfg.boot.http.bindAddress;
          message = ''
            ${opt.boot.http.bindAddress} = ${show cfg.boot.http.bindAddress} is not an IPv4 address;
            iPXE reaches the host over the user-mode network's IPv4 only (10.0.2.2). Use "127.0.0.1"
            or "0.0.0.0".
          '';
        }
        {
          assertion = cfg.boot.userNet.hostname == null || validate.isHostname cfg.boot.userNet.hostname;
          message = ''
            ${opt.boot.userNet.hostname} = ${show cfg.boot.userNet.hostname} is not a host name: use
            labels of letters, digits and '-' separated by dots, e.g. "ec-publisher".
          '';
        }
        {
          assertion = cfg.boot.userNet.model == null || validate.isNicModel cfg.boot.userNet.model;
          message = "${opt.boot.userNet.model} = ${show cfg.boot.userNet.model} is not a QEMU device name: ${nicModelHint}.";
        }
        {
          assertion = cfg.lan.model == null || validate.isNicModel cfg.lan.model;
          message = "${opt.lan.model} = ${show cfg.lan.model} is not a QEMU device name: ${nicModelHint}.";
        }
        {
          assertion = !cfg.lan.enable || cfg.lan.macvtap.queues == 1 || lib.hasPrefix "virtio-net" lanModel;
          message = ''
            ${opt.lan.macvtap.queues} = ${toString cfg.lan.macvtap.queues} needs a virtio-net LAN NIC,
            not "${lanModel}". Set ${opt.lan.macvtap.queues} = 1 or ${opt.lan.model} = "virtio-net-pci".
          '';
        }
        {
          assertion = !cfg.lan.enable || cfg.lan.vhost != "on" || lib.hasPrefix "virtio-net" lanModel;
          message = ''
            ${opt.lan.vhost} = "on" needs a virtio-net LAN NIC (vhost-net serves virtio only), not
            "${lanModel}". Set ${opt.lan.vhost} = "auto" or ${opt.lan.model} = "virtio-net-pci".
          '';
        }
      ]
      ++
        each opt.boot.userNet.dnsServers cfg.boot.userNet.dnsServers validate.isIPAddress
          "not an IPv4 or IPv6 address (e.g. \"9.9.9.9\")"
      ++
        each opt.boot.userNet.hostForwards cfg.boot.userNet.hostForwards validate.isHostForward
          "not a QEMU hostfwd rule [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT with IPv4 addresses and ports 1-65535 (e.g. \"tcp:127.0.0.1:2222-:22\")"
      ++ [
        {
          assertion = !cfg.lan.enable || lanParent != null;
          message = ''
            ${opt.lan.enable} is true but ${opt.lan.macvtap.interface} is not set. Set it to the
            wired host interface the guest should share (for example "eno1"), or set
            ${opt.lan.enable} = false.
          '';
        }
        (problem opt.lan.macvtap.name cfg.lan.macvtap.name (validate.ifNameProblem cfg.lan.macvtap.name)
          "Use an interface name of 1-15 bytes without '/', ':' or whitespace, for example \"ec-lan0\"."
        )
        (problem opt.lan.macvtap.interface lanParent (
          if lanParent == null then null else validate.ifNameProblem lanParent
        ) "Set it to the name of an existing wired interface (see `ip link`), for example \"eno1\".")
        {
          assertion = mac == null || !(validate.isMulticastMac mac);
          message = ''
            ${opt.lan.macvtap.macAddress} = ${show mac} is a multicast address (the low bit of the
            first octet is set). Use a unicast address such as "52:54:00:ec:00:01", or null for a
            stable derived one.
          '';
        }
        {
          assertion = mac == null || lib.toLower mac != "00:00:00:00:00:00";
          message = ''
            ${opt.lan.macvtap.macAddress} must not be all zero. Use a unicast address such as
            "52:54:00:ec:00:01", or null for a stable derived one.
          '';
        }
        {
          assertion = !cfg.boot.http.enable || cfg.boot.http.directory != null;
          message = ''
            ${opt.boot.http.enable} is true but ${opt.boot.http.directory} is null. Set it to a
            directory containing netboot.ipxe (for example this flake's
            packages.x86_64-linux.ec-publisher-netboot).
          '';
        }
        {
          assertion = !(cfg.boot.http.enable && cfg.boot.url != null);
          message = ''
            ${opt.boot.url} and ${opt.boot.http.enable} are both set; the guest can chain to only
            one of them. Unset ${opt.boot.url} or set ${opt.boot.http.enable} = false.
          '';
        }
      ]
      ++ lib.concatLists (lib.mapAttrsToList credentialChecks cfg.credentials)
    );

    warnings = map oneLine (
      lib.optional (!cfg.boot.http.enable && cfg.boot.http.directory != null) ''
        ${opt.boot.http.directory} is set but ${opt.boot.http.enable} is false, so the directory
        is not served. Set ${opt.boot.http.enable} = true to boot from it.
      ''
      ++ lib.optional (!cfg.lan.enable && lanParent != null) ''
        ${opt.lan.macvtap.interface} is set but ${opt.lan.enable} is false, so no LAN NIC is
        created. Set ${opt.lan.enable} = true to give the guest a LAN NIC.
      ''
    );
  };
}
