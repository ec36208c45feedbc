"""Running the harness on an offline CUDA machine (benchmarks/README.md, "On an offline GPU").

Such a machine reaches no package index, and each command sent to it carries at most about 64 MiB
of files, while MLX's CUDA build is a ~90 MB wheel. So the wheels are prepared here and sent in
parts, one part per command, on a machine that stays up between the commands:

    python -m benchmarks.gpu.prepare            # here: .gpu/upload-1/, .gpu/upload-2/, ...
    python3 -m benchmarks.gpu.stash             # there, with .gpu/upload-1 (each but the last)
    python3 -m benchmarks.gpu.install && python3 -m benchmarks.run --scale full ...
                                                # there, with the last upload

`bundle` holds what the three share: the wheels as one byte stream cut into parts, a manifest
with every size and SHA-256, and the folder outside the checkout where parts wait for the rest.
The scripts that run there use the standard library only: nothing else is installed yet.
"""
