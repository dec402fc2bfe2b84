# The publisher's netboot files in one directory, ready to serve at the boot URL or through
# services.every-channel.ipxe-qemu.boot.http.directory: `bzImage`, `initrd` and
# `netboot.ipxe` (which loads the other two by relative URL). Files are copied, not
# symlinked, so any static HTTP server can serve the directory as it is.
{ runCommand, nixos }:

let
  build = nixos.config.system.build;
  kernelFile = nixos.pkgs.stdenv.hostPlatform.linux-kernel.target;
in
runCommand "ec-publisher-netboot" { } ''
  mkdir -p $out
  cp ${build.kernel}/${kernelFile} $out/${kernelFile}
  cp ${build.netbootRamdisk}/initrd $out/initrd
  cp ${build.netbootIpxeScript}/netboot.ipxe $out/netboot.ipxe
''
