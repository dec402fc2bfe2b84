# Module-eval, part 9: the `every-channel-ipxe-qemu-doctor` wrapper the host module installs.
{
  lib,
  ec,
  evalConfig,
  enabled,
  unitOf,
  expectEq,
  expect,
  disabledConfig,
  lanDerived,
  lanExplicit,
  httpExtra,
  ...
}:

let
  # `every-channel-ipxe-qemu-doctor` must run exactly the unit's ExecStart argv with
  # `doctor` for `run`, as the unit's user. The unit's argv is read back from the rendered
  # ExecStart (escapeSystemdExecArgs: JSON strings with % and $ doubled), so the check does
  # not trust the module's own list.
  doctorOf =
    config:
    lib.findFirst (
      p: (p.name or "") == "every-channel-ipxe-qemu-doctor"
    ) null config.environment.systemPackages;
  execArgv =
    execStart:
    builtins.fromJSON (
      "[" + lib.replaceStrings [ "\" \"" "%%" "$$" ] [ "\",\"" "%" "$" ] execStart + "]"
    );
  doctorChecksFor =
    name: config:
    let
      wrapper = doctorOf config;
      argv = execArgv (unitOf config).serviceConfig.ExecStart;
      text = if wrapper == null then "" else wrapper.text;
      doctorLine = "doctor=(${
        lib.escapeShellArgs [
          "${ec}/bin/ec-ipxe-qemu"
          "doctor"
        ]
      } \"$@\" ${lib.escapeShellArgs (lib.drop 2 argv)})";
    in
    [
      (expect "${name}: doctor wrapper installed" (
        wrapper != null
      ) "no every-channel-ipxe-qemu-doctor in environment.systemPackages")
      (expectEq "${name}: the unit runs `ec-ipxe-qemu run`" [
        "${ec}/bin/ec-ipxe-qemu"
        "run"
      ] (lib.take 2 argv))
      (expect "${name}: doctor runs the unit's argv with doctor for run" (lib.hasInfix doctorLine text)
        "\n  expected the line: ${doctorLine}\n  in: ${text}"
      )
      (expect "${name}: doctor drops to the unit's user and group"
        (lib.hasInfix "/bin/setpriv --reuid=every-channel-ipxe-qemu --regid=kvm" text)
        "no setpriv to every-channel-ipxe-qemu:kvm in: ${text}"
      )
    ];
  doctorChecks =
    doctorChecksFor "user-mode" (evalConfig [ enabled ])
    ++ doctorChecksFor "lan (derived MAC)" lanDerived
    ++ doctorChecksFor "lan (explicit, https URL with $ and %)" lanExplicit
    ++ doctorChecksFor "http + extra args" httpExtra
    ++ [
      (expectEq "disabled: no doctor wrapper" null (
        lib.findFirst (p: (p.name or "") == "every-channel-ipxe-qemu-doctor") null (
          lib.attrByPath [ "environment" "systemPackages" ] [ ] disabledConfig
        )
      ))
    ];
  # the doctor wrapper, for `bash -n`
  scripts = lib.listToAttrs (
    map (w: lib.nameValuePair w.outPath w.text) [
      (doctorOf lanExplicit)
    ]
  );
in
{
  inherit doctorChecks scripts;
}
