"""A weight-normed net (both spellings, functional activations), as vocoders are written.

Reads ``c1.weight`` at top level before training (that runs parametrize's module), may
start from a checkpoint (``--init``, through ``tdump.load``), and trains with lr 0 so the
recorded weights are the ones it saves (``--save``).
"""

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import weight_norm as old_weight_norm
from torch.nn.utils.parametrizations import weight_norm

warnings.filterwarnings("ignore", category=FutureWarning)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = weight_norm(nn.Conv2d(1, 6, 3, padding=1))
        self.c2 = old_weight_norm(nn.Conv2d(6, 6, 3, padding=1))
        self.c3 = weight_norm(nn.Conv2d(6, 8, 3, padding=1), dim=None)
        self.fc = weight_norm(nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.relu(self.c3(x + F.relu(self.c2(x))))
        return self.fc(x.mean((2, 3)))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--init")
    p.add_argument("--save")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.init:
        import tdump

        model = tdump.load(a.init, arch=Net)
    else:
        model = Net()
        with torch.no_grad():  # g away from ||v||, as after training
            for p_ in model.parameters():
                p_.mul_(1 + torch.rand_like(p_))
    print("first filter norm", float(model.c1.weight[0].detach().norm()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(torch.randn(4, 1, 6, 6)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    if a.save:
        torch.save(model.state_dict(), a.save)
