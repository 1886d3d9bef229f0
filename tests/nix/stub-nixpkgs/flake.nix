# A stand-in for nixpkgs, for checking grit's flake offline: just the attributes
# grit's flake uses, each a builtins.derivation with builder /bin/sh. Packages
# are placeholders, except buildPythonApplication, which runs the package's own
# installPhase so that `nix run` starts the real grit.py (with the host python3).
{
  outputs = { self }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
      stubFor = system:
        let
          drv = name: builtins.derivation {
            inherit name system;
            builder = "/bin/sh";
            args = [ "-c" "echo stub > $out" ];
          };
          pythonPackages = {
            # Runs the package's installPhase, then wraps bin/$pname as
            # makeWrapper would for "--set-default NAME VALUE" arguments.
            buildPythonApplication = attrs: builtins.derivation {
              name = "${attrs.pname}-${attrs.version}";
              inherit system;
              inherit (attrs) src installPhase pname makeWrapperArgs;
              builder = "/bin/sh";
              args = [ "-c" ''
                export PATH=/usr/local/bin:/usr/bin:/bin
                runHook() { :; }
                cd "$src" && eval "$installPhase"
                mv "$out/bin/$pname" "$out/bin/.$pname-wrapped"
                set -- $makeWrapperArgs
                {
                  echo '#!/bin/sh'
                  while [ $# -ge 3 ] && [ "$1" = --set-default ]; do
                    echo "export $2=\"\''${$2-$3}\""; shift 3
                  done
                  echo "exec $out/bin/.$pname-wrapped \"\$@\""
                } > "$out/bin/$pname"
                chmod +x "$out/bin/$pname"
              '' ];
            };
            lmdb = drv "python3-lmdb";
            mfusepy = drv "python3-mfusepy";
            pytest = drv "python3-pytest";
            hypothesis = drv "python3-hypothesis";
          };
        in
        {
          python3Packages = pythonPackages;
          python3 = drv "python3" // { withPackages = f: drv "python3-env"; };
          # Like nixpkgs' fuse 2: the first output is "bin", the library is in "out".
          fuse = builtins.derivation {
            name = "fuse-2.9.9";
            inherit system;
            outputs = [ "bin" "out" ];
            builder = "/bin/sh";
            args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p $bin/bin $out/lib && echo stub > $bin/bin/fusermount && echo stub > $out/lib/libfuse.so.2" ];
          };
          # Like nixpkgs' fuse3: the first output is "bin", the library is in "out".
          fuse3 = builtins.derivation {
            name = "fuse-3.16.2";
            inherit system;
            outputs = [ "bin" "out" ];
            builder = "/bin/sh";
            args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p $bin/bin $out/lib && echo stub > $bin/bin/fusermount3 && echo stub > $out/lib/libfuse3.so.3" ];
          };
          util-linux = drv "util-linux";
          fetchurl = { url, hash }: drv "fetched";
          linkFarm = name: entries: drv name;
          runCommand = name: env: script: drv name;
          mkShell = attrs: drv "shell";
          stdenv.hostPlatform.system = system;
          stdenvNoCC.mkDerivation = attrs: drv "${attrs.pname}-${attrs.version}";
        };
    in
    {
      lib = {
        inherit genAttrs;
        cleanSource = src: src;
        getLib = pkg: pkg.lib or pkg.out or pkg;
        platforms.linux = systems;
        mkMerge = xs: { _type = "merge"; contents = xs; };
        mkDefault = x: x;
        optionalAttrs = cond: attrs: if cond then attrs else { };
      };
      legacyPackages = genAttrs systems stubFor;
    };
}
