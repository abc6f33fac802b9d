"""examples/slurm/pretrain.sbatch, run by bash in a fake two-node SLURM job: stub srun, scontrol and
accelerate record what each node would launch, and Accelerate's own parser reads it back."""
import os
import subprocess

from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from tests.conftest import ROOT

SBATCH = ROOT / "examples" / "slurm" / "pretrain.sbatch"
STUBS = {
    # Prints the job's hosts as `scontrol show hostnames` does.
    "scontrol": 'printf "%s\\0" "$@" > "$RECORD/scontrol"\nprintf "gpu07\\ngpu08\\n"\n',
    # Runs its command once per node, as srun with one task per node does, with that node's SLURM_NODEID.
    "srun": 'printf "%s\\0" "$@" > "$RECORD/srun"\nwhile [[ $1 == -* ]]; do shift; done\n'
            'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" || exit; done\n',
    "accelerate": 'printf "%s\\0" "$@" > "$RECORD/accelerate-$SLURM_NODEID"\n',
}
OVERRIDES = ["--config", "recipes/configs/vit_b16_roberta_base.yaml",
             'data.shards=[{path: "s3://my-bucket/laion-zh/{00000..00009}.tar"}]', "run.name=b16 laion"]


def header() -> dict[str, str]:
    """The #SBATCH options, which SLURM reads only above the script's first command."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    return dict(line.split()[1].split("=", 1) for line in lines[:first_command] if line.startswith("#SBATCH"))


def recorded(path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def test_the_sbatch_script_launches_one_accelerate_per_node_with_its_rank(tmp_path, monkeypatch):
    options = header()
    assert options["--ntasks-per-node"] == "1" and int(options["--nodes"]) > 1
    gpus = int(options["--gpus-per-node"])
    stubs, record = tmp_path / "bin", tmp_path / "record"
    for folder in (stubs, record):
        folder.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "RECORD": str(record),
           # What SLURM sets in the batch step of `sbatch --nodes 2` (the batch step runs on node 0).
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_PER_NODE": f"h100:{gpus}",
           "SLURM_NODEID": "0"}
    subprocess.run(["bash", str(SBATCH), *OVERRIDES], cwd=ROOT, env=env, check=True)

    assert recorded(record / "scontrol") == ["show", "hostnames", "gpu[07-08]"]
    assert "--ntasks-per-node=1" in recorded(record / "srun")
    monkeypatch.chdir(ROOT)  # the launch's config file is relative to the repository root, where sbatch runs
    for node in (0, 1):
        launch = recorded(record / f"accelerate-{node}")
        assert launch[0] == "launch"
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(launch[1:]))
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 2 * gpus, node)
        assert (args.main_process_ip, args.main_process_port) == ("gpu07", 29500)
        assert args.use_deepspeed and args.deepspeed_config_file == "ds_configs/zero2.json"
        assert args.training_script == "recipes/pretrain.py" and args.training_script_args == OVERRIDES
