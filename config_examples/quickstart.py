# quickstart.py: torchrun --nproc-per-node 4 config_examples/quickstart.py
import torch
import torch.distributed as dist

from pgroups import gpc

gpc.init_from_config("config_examples/parallel.yaml")  # tensor 2 x pipeline 2 on 4 ranks
tp = gpc.group("tp")                        # group, cpu_group, ranks, rank, size, device
x = torch.ones(1, device=tp.device)
dist.all_reduce(x, group=tp.group)          # a sum over this rank's tp group
mesh = gpc.device_mesh(("pp", "tp"))        # torch DeviceMesh over the same groups
megatron = gpc.megatron_groups()            # Megatron-Core's parallel_state names
if gpc.get_global_rank() == 0:
    print(gpc.describe())
    print(f"tp group {list(tp.ranks)}: sum {x.item():g}; mesh {mesh.mesh.tolist()}")
    print(f"megatron tp ranks {dist.get_process_group_ranks(megatron.tp)}")
gpc.destroy()
