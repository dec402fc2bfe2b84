# The launcher's value rules in Nix, so that a value `ec-ipxe-qemu` or `ec-macvtap` would
# refuse (exit 2, which the unit does not restart) fails evaluation instead. Pure: it needs
# only nixpkgs' `lib`. The NixOS module (../modules/ec-ipxe-qemu.nix and its asserts.nix)
# uses it; nix/tests/module-eval/ checks it directly against tests/data/refusals.json,
# the table tests/refusals.rs feeds to the launcher.
#
# Two shapes: `is*` predicates (true = fine) and `*Problem` functions that return null when
# the value is fine, else the reason as a phrase that follows the value in a message
# ("... = \"x\" contains '/'").
{ lib }:

let
  # A one-character string from a Unicode code point (Nix has no "\v", "\f" or "\u"
  # escapes: "\v" and "\f" mean "v" and "f").
  fromCodePoint = cp: builtins.fromJSON ''"\u${lib.fixedWidthString 4 "0" (lib.toHexString cp)}"'';

  # What Rust's `char::is_whitespace` and `char::is_control` match.
  whitespaceChars = map fromCodePoint (
    lib.range 9 13
    ++ [
      32
      133
      160
      5760
    ]
    ++ lib.range 8192 8202
    ++ [
      8232
      8233
      8239
      8287
      12288
    ]
  );
  controlChars = map fromCodePoint (lib.range 1 31 ++ lib.range 127 159);
  containsAny = chars: s: lib.any (c: lib.hasInfix c s) chars;

  # Printable ASCII, U+0020 to U+007E.
  printableAscii = map fromCodePoint (lib.range 32 126);
  isPrintableAscii = s: lib.all (c: lib.elem c printableAscii) (lib.stringToCharacters s);

  # Directories the unit must never own or widen (stateDir, the disk's directory).
  systemDirs = [
    "/"
    "/var"
    "/var/lib"
    "/srv"
  ];

  # stateDir and disk.path: never a system directory, and written the one way systemd,
  # tmpfiles and the launcher all read alike.
  pathProblem =
    path:
    let
      components = lib.tail (lib.splitString "/" path);
    in
    if lib.elem path systemDirs then
      "is a system directory"
    else if lib.hasSuffix "/" path then
      "ends with '/'"
    else if lib.any (c: c == "." || c == ".." || c == "") components then
      "has an empty, '.' or '..' component"
    else if containsAny [ "\"" "'" "\\" "`" ] path then
      "contains a quote, a backslash or a backquote"
    else
      null;

  # Rust's Ipv4Addr: four decimal octets 0-255 without leading zeros.
  isIPv4 =
    s:
    let
      octets = builtins.match "(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})" s;
    in
    octets != null && lib.all (o: lib.toInt o <= 255) octets;

  # Rust's Ipv6Addr: up to eight groups of 1-4 hex digits, at most one "::", optionally
  # ending in an IPv4 address (which counts as two groups).
  isIPv6 =
    s:
    let
      halves = lib.splitString "::" s;
      groupsOf = h: if h == "" then [ ] else lib.splitString ":" h;
      groups = lib.concatMap groupsOf halves;
      lastIsV4 = groups != [ ] && isIPv4 (lib.last groups);
      hexGroups = if lastIsV4 then lib.init groups else groups;
      count = builtins.length hexGroups + (if lastIsV4 then 2 else 0);
      hexOk = lib.all (g: builtins.match "[0-9a-fA-F]{1,4}" g != null) hexGroups;
      # an IPv4 part only at the very end
      v4Last = lib.all (g: !(isIPv4 g)) (lib.take (builtins.length groups - 1) groups);
    in
    builtins.length halves <= 2
    && hexOk
    && v4Last
    && (if builtins.length halves == 2 then count <= 7 else count == 8);

  # Rust's u16 parse (leading zeros allowed), 1-65535.
  isPort =
    s:
    let
      m = builtins.match "0*([0-9]{1,5})" s;
    in
    m != null && lib.toInt (builtins.head m) >= 1 && lib.toInt (builtins.head m) <= 65535;

  # The interface-name rule of ec-macvtap (`IfName`) and of the kernel: 1-15 bytes, no '/',
  # no ':', no whitespace or control characters, not "." or "..".
  ifNameProblem =
    name:
    let
      len = builtins.stringLength name;
    in
    if len == 0 then
      "is empty"
    else if len > 15 then
      "is ${toString len} bytes long; Linux allows at most 15"
    else if lib.hasInfix "/" name then
      "contains '/'"
    else if lib.hasInfix ":" name then
      "contains ':'"
    else if containsAny whitespaceChars name then
      "contains whitespace"
    else if containsAny controlChars name then
      "contains a control character"
    else if name == "." || name == ".." then
      "is '.' or '..'"
    else
      null;

  # The fw_cfg file name a credential travels under. QEMU refuses fw_cfg names over 55
  # bytes (FW_CFG_MAX_FILE_PATH 56 with its NUL: "name too long (max. 55 char)").
  credentialPrefix = "opt/io.systemd.credentials/";
  credentialNameMax = 55 - builtins.stringLength credentialPrefix;

  # The launcher's `--credential NAME=FILE` rule: systemd's credential_name_valid()
  # (a valid file name and fd name: not empty, not "." or "..", no '/' or ':', printable
  # ASCII only) plus the fw_cfg length limit above (28 bytes).
  credentialNameProblem =
    name:
    let
      len = builtins.stringLength name;
    in
    if len == 0 then
      "is empty"
    else if name == "." || name == ".." then
      "is '.' or '..'"
    else if lib.hasInfix "/" name then
      "contains '/'"
    else if lib.hasInfix ":" name then
      "contains ':'"
    else if !(isPrintableAscii name) then
      "contains a character that is not printable ASCII"
    else if len > credentialNameMax then
      "is ${toString len} bytes long; QEMU's fw_cfg name ${credentialPrefix}NAME allows a NAME of at most ${toString credentialNameMax}"
    else
      null;

  # On top of that, what a unit file's `LoadCredential=NAME:PATH` would not keep as written:
  # systemd expands '%' specifiers and consumes backslashes in NAME, and trims the value.
  loadCredentialNameProblem =
    name:
    let
      problem = credentialNameProblem name;
    in
    if problem != null then
      problem
    else if lib.hasInfix "%" name || lib.hasInfix "\\" name then
      "contains '%' or a backslash, which LoadCredential= would rewrite"
    else if lib.hasPrefix " " name || lib.hasSuffix " " name then
      "begins or ends with a space, which the unit file would drop"
    else
      null;
in
{
  inherit
    isIPv4
    isIPv6
    isPort
    ifNameProblem
    credentialNameProblem
    loadCredentialNameProblem
    credentialNameMax
    ;

  # An absolute path without whitespace or '%' (both would need quoting in tmpfiles.d
  # lines and unit files; '%' is a systemd specifier): for `types.strMatching`.
  absolutePathRegex = "/[^[:space:]%]*";

  macAddressRegex = "[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}";

  # The launcher's disk-size rule (`ByteSize`): digits with an optional unit K, M, G or T
  # (powers of 1024, optionally followed by "iB") or B, in any case; at least 1M and at
  # most 64T. The number is clamped while it is read, so a long one cannot overflow.
  isDiskSize =
    size:
    let
      parts = builtins.match "([0-9]+)([kKmMgGtT]|[kKmMgGtT][iI][bB]|[bB])?" size;
      unit = lib.toLower (lib.substring 0 1 (toString (builtins.elemAt parts 1)));
      shift =
        {
          "" = 0;
          b = 0;
          k = 10;
          m = 20;
          g = 30;
          t = 40;
        }
        .${unit};
      cap = 140737488355328; # 2^47, above every limit below
      number = lib.foldl' (n: d: lib.min cap (n * 10 + lib.toInt d)) 0 (
        lib.stringToCharacters (builtins.elemAt parts 0)
      );
      # number * 2^shift within [2^20, 2^46], without multiplying
      pow2 = e: lib.foldl' (x: _: x * 2) 1 (lib.range 1 e);
      minimum = if shift >= 20 then 1 else pow2 (20 - shift);
      maximum = pow2 (46 - shift);
    in
    parts != null && number >= minimum && number <= maximum;

  # `--dns` (an IpAddr).
  isIPAddress = s: isIPv4 s || isIPv6 s;

  # `--host-forward` (`HostForward`):
  # [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT with IPv4 addresses.
  isHostForward =
    rule:
    let
      m = builtins.match "(([^:-]*):)?([^:-]*):([^:-]*)-([^:]*):(.*)" rule;
      at = builtins.elemAt m;
      addrOk = a: a == "" || isIPv4 a;
    in
    m != null
    && lib.elem (if at 0 == null then "" else at 1) [
      ""
      "tcp"
      "udp"
    ]
    && addrOk (at 2)
    && isPort (at 3)
    && addrOk (at 4)
    && isPort (at 5);

  # `--hostname` (`Hostname`): dot-separated labels of letters, digits and '-', 1-63 bytes
  # each, not starting or ending with '-', 253 bytes in all.
  isHostname =
    name:
    builtins.stringLength name <= 253
    && lib.all (l: builtins.match "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?" l != null) (
      lib.splitString "." name
    );

  # `--boot-nic-model`, `--lan-nic-model` (`NicModel`).
  isNicModel = m: builtins.match "[A-Za-z0-9._-]{1,64}" m != null;

  # The low bit of the first octet marks a group (multicast/broadcast) address.
  isMulticastMac =
    mac:
    lib.elem (lib.toLower (builtins.substring 1 1 mac)) [
      "1"
      "3"
      "5"
      "7"
      "9"
      "b"
      "d"
      "f"
    ];

  # `--boot-url` (`BootUrl`): http, https or tftp (any case), a host, an optional port
  # (1-65535 or an iPXE ${setting}), no whitespace, control characters, quotes,
  # backslashes or backquotes.
  bootUrlProblem =
    url:
    let
      m = builtins.match "([^:]*)://([^/?#]*)(.*)" url;
      scheme = lib.toLower (builtins.elemAt m 0);
      authority = builtins.elemAt m 1;
      hostport = lib.last (lib.splitString "@" authority);
      v6 = builtins.match "\\[([^]]*)](.*)" hostport;
      plain = builtins.match "([^:]*)(:(.*))?" hostport;
      # the launcher splits host and port at the last ':'
      lastColon = builtins.match "(.*):([^:]*)" hostport;
      host =
        if lib.hasPrefix "[" hostport then
          (if v6 == null then null else builtins.elemAt v6 0)
        else if lastColon != null then
          builtins.elemAt lastColon 0
        else
          builtins.elemAt plain 0;
      port =
        if lib.hasPrefix "[" hostport then
          (
            if v6 != null && lib.hasPrefix ":" (builtins.elemAt v6 1) then
              lib.removePrefix ":" (builtins.elemAt v6 1)
            else
              null
          )
        else if lastColon != null then
          builtins.elemAt lastColon 1
        else
          null;
    in
    if m == null then
      "is not a URL like http://HOST/PATH"
    else if
      !(lib.elem scheme [
        "http"
        "https"
        "tftp"
      ])
    then
      "has the scheme \"${builtins.elemAt m 0}\"; use http, https or tftp"
    else if
      containsAny (
        whitespaceChars
        ++ controlChars
        ++ [
          "\""
          "'"
          "\\"
          "`"
        ]
      ) url
    then
      "contains whitespace, a control character, a quote, a backslash or a backquote"
    else if lib.hasPrefix "[" hostport && v6 == null then
      "has an unterminated IPv6 address"
    else if host == "" || host == null then
      "has no host"
    else if port != null && !(lib.hasPrefix "\${" port || isPort port) then
      "has the port \"${port}\", not a number between 1 and 65535"
    else
      null;

  inherit systemDirs pathProblem;

  # stateDir: a path as above whose longest socket, console.sock, fits a Unix socket
  # address (107 bytes), as the launcher checks.
  stateDirProblem =
    dir:
    let
      socket = "${dir}/console.sock";
    in
    if pathProblem dir != null then
      pathProblem dir
    else if builtins.stringLength socket > 107 then
      "is too long: the console socket ${socket} would exceed the 107 bytes of a Unix socket path"
    else
      null;

  # disk.path: a path as above, not directly in a system directory (the unit would have to
  # make that directory writable).
  diskPathProblem =
    path:
    if pathProblem path != null then
      pathProblem path
    else if lib.elem (dirOf path) systemDirs then
      "lies directly in the system directory ${dirOf path}, which the unit would have to make writable (ReadWritePaths=${dirOf path})"
    else
      null;

  # `--ready-pattern` is a Rust regex. Nix cannot compile one, so this checks what breaks
  # most patterns: it must not be empty (an empty pattern matches every line), and its
  # parentheses and brackets must balance (backslash escapes, and a `]` first in a class,
  # are literal). The launcher parses the full syntax at start and exits 2 (not restarted).
  readyPatternProblem =
    pattern:
    let
      step =
        st: c:
        if st.bad != null then
          st
        else if st.escaped then
          st // { escaped = false; }
        else if c == "\\" then
          st // { escaped = true; }
        else if st.class then
          (if c == "]" && !st.classStart then st // { class = false; } else st // { classStart = false; })
        else if c == "[" then
          st
          // {
            class = true;
            classStart = true;
          }
        else if c == "(" then
          st // { depth = st.depth + 1; }
        else if c == ")" then
          (
            if st.depth == 0 then
              st // { bad = "has a ')' without its '('"; }
            else
              st // { depth = st.depth - 1; }
          )
        else
          st;
      end = lib.foldl' step {
        bad = null;
        escaped = false;
        class = false;
        classStart = false;
        depth = 0;
      } (lib.stringToCharacters pattern);
    in
    if pattern == "" then
      "is empty (it would match every console line)"
    else if end.bad != null then
      end.bad
    else if end.escaped then
      "ends with a lone backslash"
    else if end.class then
      "has a '[' without its ']'"
    else if end.depth > 0 then
      "has a '(' without its ')'"
    else
      null;
}
