# Module-eval, part 6: `credentials` become LoadCredential= lines, and the credential-name
# rules of nix/lib/validate.nix. `config` is the configuration, for systemd-analyze.
{
  lib,
  evalConfig,
  opt,
  enabled,
  unitOf,
  failedAssertions,
  expectEq,
  expect,
  sc,
  withCredentials,
  textOf,
  linesOf,
  sectionOf,
  validate,
  ...
}:

let
  # Credentials: one secret outside the store, one non-secret store file, and the longest
  # name QEMU's fw_cfg takes (28 bytes).
  tunersFile = "/nix/store/55555555555555555555555555555555-ec-tuners";
  longName = lib.fixedWidthString 28 "x" "";
  credentialsConfig = evalConfig [
    (withCredentials {
      "ec.tuners" = {
        file = tunersFile;
        secret = false;
      };
      mesh-key.file = "/run/keys/ec-mesh-key";
      ${longName}.file = "/run/keys/long";
    })
  ];
  credentialChecks = [
    (expectEq "credentials: no failed assertions" [ ] (failedAssertions credentialsConfig))
    (expectEq "credentials: LoadCredential=NAME:FILE, one line each" [
      "LoadCredential=ec.tuners:${tunersFile}"
      "LoadCredential=mesh-key:/run/keys/ec-mesh-key"
      "LoadCredential=${longName}:/run/keys/long"
    ] (lib.filter (lib.hasPrefix "LoadCredential=") (sectionOf "Service" (textOf credentialsConfig))))
    (expectEq "credentials: the launcher's command line is unchanged (it reads $CREDENTIALS_DIRECTORY)"
      sc.ExecStart
      (unitOf credentialsConfig).serviceConfig.ExecStart
    )
    (expect "no credentials: no LoadCredential= line" (
      !(lib.any (lib.hasPrefix "LoadCredential") (linesOf (textOf (evalConfig [ enabled ]))))
    ) (textOf (evalConfig [ enabled ])))
    (expectEq "credentials default to secret" true
      (lib.getAttrFromPath opt credentialsConfig).credentials.mesh-key.secret
    )
    # the rule the launcher shares, checked directly
    (expectEq "validate.nix: credential names" [ null null null "is empty" "is '.' or '..'" ] (
      map validate.credentialNameProblem [
        "ec.tuners"
        longName
        "a b"
        ""
        ".."
      ]
    ))
    (expectEq "validate.nix: a 29-byte credential name is too long for fw_cfg"
      "is 29 bytes long; QEMU's fw_cfg name opt/io.systemd.credentials/NAME allows a NAME of at most 28"
      (validate.credentialNameProblem "${longName}x")
    )
    (expectEq "validate.nix: a space inside a name is systemd's, outside it is the unit file's"
      [
        null
        "begins or ends with a space, which the unit file would drop"
      ]
      (
        map validate.loadCredentialNameProblem [
          "a b"
          "ab "
        ]
      )
    )
  ];
in
{
  inherit credentialChecks;
  config = credentialsConfig;
}
