"""Writes tests/data/state_dict_0_1_0.pt with torchsven 0.1.0 (commit 68165c1).

Run it with that version on the path: PYTHONPATH=<checkout of 68165c1>/src python this.py
"""

import copy

import torch
from torch import nn

import torchsven


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


g = torch.Generator().manual_seed(1)
x = torch.randn(12, 3, generator=g, dtype=torch.float64)
y = torch.randn(12, 1, generator=g, dtype=torch.float64)
out = {}
for name, kw in {
    "adaptive": {"damping": "adaptive"},
    "momentum": {"lr": 0.3, "momentum": 0.5, "precondition": "post"},
    "masked": {"lr": 0.5, "param_fraction": 0.5, "mask": "tensors", "seed": 3, "spectrum_every": 1},
}.items():
    m = model()
    opt = torchsven.Sven(m, **kw)
    for _ in range(2):
        opt.step(lambda m=m: m(x) - y)
    out[name] = {
        "kwargs": kw,
        "model": copy.deepcopy(m.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
    }
    # the next step as 0.1.0 takes it
    opt.step(lambda m=m: m(x) - y)
    out[name]["after"] = [p.detach().clone() for p in m.parameters()]
out["x"], out["y"] = x, y
torch.save(out, __file__.replace("make_state_dict_0_1_0.py", "state_dict_0_1_0.pt"))
print("written with", torchsven.__version__, torchsven.__file__)
