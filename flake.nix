{
  description = "grit: incremental pipelines of shell-script steps (SQLite + LMDB + FUSE)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      version = "0.1.0";
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # grit.py with lmdb (linked against nixpkgs' LMDB 0.9) and mfusepy; mfusepy
      # loads libfuse 3 (the kernel's writeback cache) through FUSE_LIBRARY_PATH
      # (getLib: the first output of nixpkgs' fuse3 is "bin", the library is in another).
      gritFor = pkgs: pkgs.python3Packages.buildPythonApplication {
        pname = "grit";
        inherit version;
        pyproject = false;
        src = nixpkgs.lib.cleanSource ./.;
        dependencies = with pkgs.python3Packages; [ lmdb mfusepy ];
        dontBuild = true;
        installPhase = ''
          runHook preInstall
          install -Dm755 grit.py $out/bin/grit
          runHook postInstall
        '';
        makeWrapperArgs = [ "--set-default" "FUSE_LIBRARY_PATH" "${nixpkgs.lib.getLib pkgs.fuse3}/lib/libfuse3.so.3" ];
        meta = {
          description = "Incremental pipelines of shell-script steps";
          mainProgram = "grit";
          platforms = nixpkgs.lib.platforms.linux;
        };
      };

      # The wheels build_zipapp.sh packs into grit.pyz: [ python tag, file, hash ].
      wheelFiles = [
        [ "cp39" "lmdb-1.7.5-cp39-cp39-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl" "sha256-CxdGBR675XT+S/MT1HvW0hJaDloDXIj1ZQ5LrkZo5ss=" ]
        [ "cp39" "lmdb-1.7.5-cp39-cp39-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl" "sha256-6KuWWAf3C3BGRCxkRMVeYcB5pAv5VgLjw44VzpmddFU=" ]
        [ "cp310" "lmdb-1.7.5-cp310-cp310-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl" "sha256-ynbL6aQmRHOY6WCniXT2TIs4AU10FsELhDwTAeBWC6g=" ]
        [ "cp310" "lmdb-1.7.5-cp310-cp310-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl" "sha256-up2ShF96JCRKtIpx51+11hkLfct13sQL5wwGXhNq5JE=" ]
        [ "cp311" "lmdb-1.7.5-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl" "sha256-cWyT0XC+ImMOLlYMZwgfgAlblRsy3gMqh2ucIN/4zAc=" ]
        [ "cp311" "lmdb-1.7.5-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl" "sha256-u12CDVKNwexz5eS2yNnVQQN3klbVBMGoQmHKlE50kWA=" ]
        [ "cp312" "lmdb-1.7.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl" "sha256-8tm34QL8/l4M+zrN69QD61XMvl9yAtj0nWC9r7FUbR4=" ]
        [ "cp312" "lmdb-1.7.5-cp312-cp312-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl" "sha256-aMwhMUoz+qwbdJZFqXa3ZV5/p8wQSnI2XSQp0tt/Y0I=" ]
        [ "cp313" "lmdb-1.7.5-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl" "sha256-hl83T2IGq0qsuS/7HcYS7hoxpCHbfIlzOr4GuBrIfLA=" ]
        [ "cp313" "lmdb-1.7.5-cp313-cp313-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl" "sha256-l7yz/BKEGogo25GOSU/g/QFqc9JoCtgw11cZuzv052o=" ]
        [ "py3" "tomli-2.0.1-py3-none-any.whl" "sha256-k53j56YWGvDIh++Rt9QaU+fFocqXYyX0KctG6pvDDsw=" ]
        [ "py3" "mfusepy-3.1.1-py3-none-any.whl" "sha256-aftwz8f3zOWV5v9Yb4RR2CmPAfGChqFX8k9WSyTsWjc=" ]
      ];

      # grit.pyz, built offline from the wheels above.
      gritPyzFor = pkgs:
        let
          fetch = w: {
            name = builtins.elemAt w 1;
            path = pkgs.fetchurl {
              url = "https://files.pythonhosted.org/packages/${builtins.elemAt w 0}/"
                + "${builtins.substring 0 1 (builtins.elemAt w 1)}/"
                + "${builtins.head (builtins.split "-" (builtins.elemAt w 1))}/${builtins.elemAt w 1}";
              hash = builtins.elemAt w 2;
            };
          };
          wheels = pkgs.linkFarm "grit-pyz-wheels" (map fetch wheelFiles);
        in
        pkgs.stdenvNoCC.mkDerivation {
          pname = "grit-pyz";
          inherit version;
          src = nixpkgs.lib.cleanSource ./.;
          nativeBuildInputs = [ pkgs.python3 ];
          buildPhase = ''
            runHook preBuild
            patchShebangs build_zipapp.sh
            ./build_zipapp.sh --wheels ${wheels} -o grit.pyz
            runHook postBuild
          '';
          # The pyz is for servers without Nix: keep "#!/usr/bin/env python3"
          # (and the zip's offsets) exactly as built.
          dontPatchShebangs = true;
          installPhase = ''
            runHook preInstall
            install -Dm755 grit.pyz $out/bin/grit.pyz
            runHook postInstall
          '';
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        grit = gritFor pkgs;
        grit-pyz = gritPyzFor pkgs;
        default = grit;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.grit}/bin/grit";
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (ps: with ps; [ lmdb mfusepy pytest hypothesis ]))
            pkgs.fuse
            pkgs.fuse3
          ];
          FUSE_LIBRARY_PATH = "${nixpkgs.lib.getLib pkgs.fuse3}/lib/libfuse3.so.3";
        };
      });

      overlays.default = final: prev: {
        grit = gritFor final;
      };

      # Installs grit and makes FUSE usable by ordinary users: the setuid
      # fusermount wrappers come with programs.fuse, off by default on recent NixOS.
      nixosModules.default = { lib, pkgs, options, ... }: {
        config = lib.mkMerge [
          { environment.systemPackages = [ (gritFor pkgs) pkgs.fuse3 ]; }
          (lib.optionalAttrs (options.programs.fuse ? enable) {
            programs.fuse.enable = lib.mkDefault true;
          })
        ];
      };

      # The engine's test suite run in the build sandbox: no /dev/fuse and no
      # network there, so the FUSE tests skip themselves; the pyz build, the flake
      # check and examples/run (which makes a venv with pip) are left out.
      checks = forAllSystems (pkgs: {
        tests = pkgs.runCommand "grit-tests"
          {
            nativeBuildInputs = [
              (pkgs.python3.withPackages (ps: with ps; [ lmdb mfusepy pytest hypothesis ]))
              pkgs.util-linux
            ];
          } ''
          cp -r ${nixpkgs.lib.cleanSource ./.} src
          chmod -R u+w src
          cd src
          HOME=$TMPDIR python -m pytest -q -p no:cacheprovider tests -k "not zipapp and not flake and not readme_example"
          touch $out
        '';
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.grit;
      });
    };
}
