# Module-eval, part 7: the shared refusal table tests/data/refusals.json, given to the module
# and to nix/lib/validate.nix directly.
{
  lib,
  evalConfig,
  with',
  failedAssertions,
  expect,
  textOf,
  validate,
  ...
}:

let
  # ---------------------------------------------------------------- refusal table
  # tests/data/refusals.json: the same values go to the launcher in tests/refusals.rs.
  refusalTable = builtins.fromJSON (builtins.readFile ../../../tests/data/refusals.json);
  refusedByModule =
    case:
    let
      settings = (case.context or { }) // {
        ${case.option} = case.value;
      };
      def = lib.foldl' (
        acc: path: lib.recursiveUpdate acc (lib.setAttrByPath (lib.splitString "." path) settings.${path})
      ) { enable = true; } (lib.attrNames settings);
      config = evalConfig [ (with' def) ];
      r = builtins.tryEval (builtins.deepSeq (textOf config) (failedAssertions config));
    in
    {
      refused = !(r.success && r.value == [ ]);
      # the failed assertions' messages (none when a type refused the value)
      messages = if r.success then r.value else [ ];
    };
  refusalChecks = map (
    case:
    let
      got = refusedByModule case;
    in
    expect
      "refusal table: ${case.option} = ${builtins.toJSON case.value} is ${
        if case.refused then "refused" else "accepted"
      }"
      (
        got.refused == case.refused
        && lib.all (lib.hasPrefix "services.every-channel.ipxe-qemu.") got.messages
      )
      "the module ${
        if got.refused then "refused" else "accepted"
      } it, with ${builtins.toJSON got.messages}"
  ) refusalTable.cases;
  refusedBadValues = lib.filter (c: c.refused) refusalTable.cases;

  # The same table against nix/lib/validate.nix directly, without the module: for each
  # option a validator covers, the value is accepted exactly when the table says so. The
  # other options (ranges, enums, rules across options) are the module's types and
  # assertions, checked above.
  noProblem = problemOf: v: problemOf v == null;
  absolute = v: builtins.match validate.absolutePathRegex v != null;
  validatorOf = {
    "stateDir" = v: absolute v && validate.stateDirProblem v == null;
    "disk.path" = v: absolute v && validate.diskPathProblem v == null;
    "disk.size" = validate.isDiskSize;
    "boot.url" = noProblem validate.bootUrlProblem;
    "boot.readyPattern" = noProblem validate.readyPatternProblem;
    "boot.http.bindAddress" = validate.isIPv4;
    "boot.userNet.dnsServers" = lib.all validate.isIPAddress;
    "boot.userNet.hostForwards" = lib.all validate.isHostForward;
    "boot.userNet.hostname" = validate.isHostname;
    "boot.userNet.model" = validate.isNicModel;
    "lan.model" = validate.isNicModel;
    "lan.macvtap.name" = noProblem validate.ifNameProblem;
  };
  coveredCases = lib.filter (c: validatorOf ? ${c.option}) refusalTable.cases;
  validatorChecks =
    map (
      case:
      let
        accepted = validatorOf.${case.option} case.value;
      in
      expect "validate.nix: ${case.option} = ${builtins.toJSON case.value} is ${
        if case.refused then "refused" else "accepted"
      }" (accepted != case.refused) "validate.nix ${if accepted then "accepted" else "refused"} it"
    ) coveredCases
    ++ [
      (expect "validate.nix covers every option of the table it can" (lib.all (
        o: lib.any (c: c.option == o) refusalTable.cases
      ) (lib.attrNames validatorOf)) "an option of validatorOf has no case in tests/data/refusals.json")
    ];
in
{
  inherit
    refusalChecks
    validatorChecks
    refusalTable
    refusedBadValues
    coveredCases
    ;
}
