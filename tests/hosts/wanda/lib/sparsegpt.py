# The role of locuslab/wanda lib/sparsegpt.py, written short: the host updates the kept weights itself.
import torch


class SparseGPT:
    """Input Hessian from forward hooks, then an OBS sweep over the columns that picks the mask
    (per 128-column block, or per group of m for n:m) and compensates the columns to the right."""

    def __init__(self, layer):
        self.layer = layer
        columns = layer.weight.shape[1]
        self.H = torch.zeros((columns, columns), device=layer.weight.device)
        self.tokens = 0

    def add_batch(self, inp, out):
        inp = inp.reshape(-1, inp.shape[-1]).float()
        self.H += inp.t() @ inp
        self.tokens += inp.shape[0]

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H / self.tokens
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i in range(W.shape[1]):
            if prune_n == 0 and i % blocksize == 0:
                score = W[:, i:i + blocksize] ** 2 / torch.diag(U)[i:i + blocksize] ** 2
                mask[:, i:i + blocksize] = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            if prune_n != 0 and i % prune_m == 0:
                score = W[:, i:i + prune_m] ** 2 / torch.diag(U)[i:i + prune_m] ** 2
                mask[:, i:i + prune_m].scatter_(1, torch.topk(score, prune_n, dim=1, largest=False)[1], True)
            err = W[:, i] * mask[:, i] / U[i, i]  # removing the pruned entries of column i ...
            W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)  # ... compensated on the columns to its right
        W[mask] = 0
        self.layer.weight.data = W.to(self.layer.weight.dtype)
        return mask | dead.unsqueeze(0)

    def free(self):
        self.H = None
