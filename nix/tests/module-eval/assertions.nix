# Module-eval, part 2: every assertion of the host module fires alone, with a message that
# starts with the option's full path (the `opt` prefix), and values close to a refusal pass.
{
  lib,
  netbootDir,
  evalConfig,
  with',
  failedAssertions,
  expectEq,
  expect,
  withCredentials,
  ...
}:

let
  # A one-character string from a Unicode code point (Nix has no \v, \f or \u escapes).
  fromCodePoint = cp: builtins.fromJSON ''"\u${lib.fixedWidthString 4 "0" (lib.toHexString cp)}"'';
  # The module enabled with `attrs` besides.
  enabledWith = attrs: with' ({ enable = true; } // attrs);
  # The LAN on, on eth0, with `extra` merged in deeply (`lan.*` in `extra` keeps lan.enable).
  lanOn =
    extra:
    enabledWith (
      lib.recursiveUpdate {
        lan.enable = true;
        lan.macvtap.interface = "eth0";
      } extra
    );
  assertionCases = {
    "lan.enable without interface" = {
      def = enabledWith {
        lan.enable = true;
      };
      says = "lan.macvtap.interface is not set";
    };
    "macvtap name over 15 bytes" = {
      def = lanOn { lan.macvtap.name = "ec-lan0-far-too-long"; };
      says = "is 20 bytes long; Linux allows at most 15";
    };
    "macvtap name with slash" = {
      def = lanOn { lan.macvtap.name = "ec/lan0"; };
      says = "contains '/'";
    };
    "macvtap name with whitespace" = {
      def = lanOn { lan.macvtap.name = "ec lan0"; };
      says = "contains whitespace";
    };
    "macvtap name with tab" = {
      def = lanOn { lan.macvtap.name = "ec\tlan0"; };
      says = "contains whitespace";
    };
    "macvtap name with vertical tab" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 11}lan0"; };
      says = "contains whitespace";
    };
    "macvtap name with no-break space" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 160}lan0"; };
      says = "contains whitespace";
    };
    "macvtap name with ideographic space" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 12288}l0"; };
      says = "contains whitespace";
    };
    "macvtap name with colon" = {
      def = lanOn { lan.macvtap.name = "ec:lan0"; };
      says = "contains ':'";
    };
    "macvtap name with a C0 control character" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 1}lan0"; };
      says = "contains a control character";
    };
    "macvtap name with DEL" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 127}lan0"; };
      says = "contains a control character";
    };
    "macvtap name with a C1 control character" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 144}lan0"; };
      says = "contains a control character";
    };
    "macvtap name empty" = {
      def = lanOn { lan.macvtap.name = ""; };
      says = "is empty";
    };
    "macvtap name dot-dot" = {
      def = lanOn { lan.macvtap.name = ".."; };
      says = "is '.' or '..'";
    };
    "parent interface name invalid" = {
      def = lanOn { lan.macvtap.interface = "eno1 "; };
      says = ''lan.macvtap.interface = "eno1 " contains whitespace'';
    };
    "parent interface name with colon" = {
      def = lanOn { lan.macvtap.interface = "eth0:1"; };
      says = "lan.macvtap.interface = \"eth0:1\" contains ':'";
    };
    "multicast MAC" = {
      def = lanOn { lan.macvtap.macAddress = "01:00:5e:00:00:fb"; };
      says = "is a multicast";
    };
    "all-zero MAC" = {
      def = lanOn { lan.macvtap.macAddress = "00:00:00:00:00:00"; };
      says = "must not be all zero";
    };
    "boot.http without directory" = {
      def = enabledWith {
        boot.http.enable = true;
      };
      says = "boot.http.directory is null";
    };
    "readyPattern empty" = {
      def = enabledWith {
        boot.readyPattern = "";
      };
      says = "is empty";
    };
    "readyPattern with an open parenthesis" = {
      def = enabledWith {
        boot.readyPattern = "(ready";
      };
      says = "has a '(' without its ')'";
    };
    "readyPattern with a stray parenthesis" = {
      def = enabledWith {
        boot.readyPattern = "ready)";
      };
      says = "has a ')' without its '('";
    };
    "readyPattern with an open bracket" = {
      def = enabledWith {
        boot.readyPattern = "[a-z";
      };
      says = "has a '[' without its ']'";
    };
    "readyPattern ending in a backslash" = {
      def = enabledWith {
        boot.readyPattern = "ready\\";
      };
      says = "ends with a lone backslash";
    };
    "stateDir too long for the console socket" = {
      def = enabledWith {
        stateDir = "/var/lib/${lib.fixedWidthString 90 "x" ""}";
      };
      says = "the console socket";
    };
    "lan.vhost on with a LAN NIC that is not virtio" = {
      def = enabledWith {
        lan = {
          enable = true;
          macvtap.interface = "eth0";
          vhost = "on";
          model = "e1000";
        };
      };
      says = ''lan.vhost = "on" needs a virtio-net LAN NIC'';
    };
    "boot.url and boot.http together" = {
      def = enabledWith {
        boot.url = "http://10.0.2.2/x.ipxe";
        boot.http = {
          enable = true;
          directory = netbootDir;
        };
      };
      says = "are both set";
    };
    "a secret credential in the Nix store" = {
      def = withCredentials { mesh-key.file = "${netbootDir}/key"; };
      says = ''credentials.mesh-key.file = "${netbootDir}/key" is in the Nix store'';
    };
    "a secret credential that is the store itself" = {
      def = withCredentials { mesh-key.file = "/nix/store"; };
      says = "is in the Nix store";
    };
  }
  //
    lib.mapAttrs'
      (
        name: says:
        lib.nameValuePair "credential name ${builtins.toJSON name}" {
          def = withCredentials { ${name}.file = "/run/keys/x"; };
          says = "credentials.${lib.strings.escapeNixIdentifier name}: the credential name ${says}";
        }
      )
      {
        "" = "is empty";
        "." = "is '.' or '..'";
        ".." = "is '.' or '..'";
        "ec/tuners" = "contains '/'";
        "ec:tuners" = "contains ':'";
        "ec\ttuners" = "contains a character that is not printable ASCII";
        "ec${fromCodePoint 127}" = "contains a character that is not printable ASCII";
        "tuners-é" = "contains a character that is not printable ASCII";
        "${lib.fixedWidthString 29 "x" ""}" =
          "is 29 bytes long; QEMU's fw_cfg name opt/io.systemd.credentials/NAME allows a NAME of at most 28";
        "ec%n" = "contains '%' or a backslash";
        "ec\\n" = "contains '%' or a backslash";
        " ec" = "begins or ends with a space";
        "ec " = "begins or ends with a space";
      };
  assertionChecks =
    lib.mapAttrsToList (
      name: case:
      let
        failed = failedAssertions (evalConfig [ case.def ]);
      in
      expect "assertion fires: ${name}"
        (
          builtins.length failed == 1
          && lib.hasInfix case.says (builtins.head failed)
          # every message starts with the full option path (the `opt` prefix)
          && lib.hasPrefix "services.every-channel.ipxe-qemu." (builtins.head failed)
        )
        "expected exactly one failed assertion naming the option and mentioning '${case.says}', got ${builtins.toJSON failed}"
    ) assertionCases
    ++ [
      # 'f' and 'v' are letters, not the escapes "\f" and "\v" (which Nix does not have)
      (expectEq "readyPatterns with escaped and bracketed parentheses pass" [ ] (
        failedAssertions (evalConfig [
          (enabledWith {
            boot.readyPattern = "^(ec-publisher: ready|[)(]\\)\\(x)$";
          })
        ])
      ))
      (expectEq "a []] class passes" [ ] (
        failedAssertions (evalConfig [
          (enabledWith {
            boot.readyPattern = "[]a]+ ready";
          })
        ])
      ))
      (expectEq "names with f and v pass the interface-name rule" [ ] (
        failedAssertions (evalConfig [
          (lanOn {
            lan.macvtap.interface = "enp0s31f6";
            lan.macvtap.name = "ec-veth0";
          })
        ])
      ))
    ];
in
{
  inherit assertionChecks;
}
