"""Teacher-student baselines: SCRUB and Bad Teacher (METHOD.md section 3). Both distil with
`kl_to_teacher` = KL(p_teacher || p_student) at temperature 1, batch-averaged.

- SCRUB (Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine
  Unlearning", NeurIPS 2023; github.com/meghdadk/SCRUB): the student (the model, starting at
  theta_o) and the frozen teacher theta_o. In each of the first `scrub_max_steps` epochs a
  *max pass* over D_u comes first: one optimiser step per forget batch on -KL(teacher ||
  student), pushing the student away from the teacher on D_u. Then every epoch's retain
  loop takes *min steps*: alpha * KL(teacher || student) + gamma * CE on D_r.
  Choice: the max pass is a separate pass through the `before_epoch` hook with the engine's
  own optimiser (SCRUB alternates passes this way, `train_distill(..., "maximize")` then
  `"minimize"`), not an extra term in the retain step. Its steps use the current learning
  rate and do not advance the cosine schedule (the schedule is per retain step; SCRUB's
  own lr schedule is per epoch). SCRUB's code runs the max pass while `epoch <= msteps`
  (msteps + 1 passes); here `scrub_max_steps` is the number of passes.
- Bad Teacher (Chundawat, Tarun, Mandal, Kankanhalli, "Can Bad Teaching Induce Forgetting?
  Unlearning in Deep Networks Using an Incompetent Teacher", AAAI 2023): KL to theta_o
  ("competent teacher") on retain batches and KL to a randomly initialised network of the
  same architecture ("incompetent teacher") on forget batches. The paper mixes forget and
  (30% of the) retain samples in one batch and averages; here each step sums a
  batch-averaged retain term and a batch-averaged forget term.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from coun_tune.core.methods.base import HParam, Method, MethodContext, RetainStep, kl_to_teacher


class SCRUB(Method):
    """Min step (retain loop): alpha * KL(t(x1) || s(x1)) + gamma * CE(s(x1), y), on the
    engine's view 1 x1 (N, C, H, W) and its student logits (N, K).
    Max pass (before_epoch, epochs < scrub_max_steps): per forget batch x_u (n, C, H, W),
    one SGD step on -KL(t(x_u) || s(x_u))."""

    name = "scrub"
    reads_forget = True
    hparams = (
        HParam("scrub_max_steps", 2, 1, 10, kind="int", help="SCRUB: epochs that start with a max pass over D_u",
               valid=(0, float("inf"))),
        HParam("scrub_alpha", 1.0, 0.1, 3.0, log=True, help="SCRUB: weight of KL to the teacher on D_r",
               valid=(0.0, float("inf"))),
        HParam("scrub_gamma", 1.0, 0.1, 3.0, log=True, help="SCRUB: weight of CE on D_r", valid=(0.0, float("inf"))),
    )

    def before_epoch(self, ctx: MethodContext, epoch: int) -> None:
        if epoch >= ctx.hparams["scrub_max_steps"]:
            return
        if ctx.optimizer is None:
            raise RuntimeError("SCRUB's max pass needs ctx.optimizer (the engine sets it)")
        from coun_tune.core.engine import DivergedError  # lazy: the engine imports this package

        for xf, _ in ctx.forget_epoch():
            with torch.no_grad():
                teacher = ctx.original(xf)
            loss = -kl_to_teacher(ctx.model(xf), teacher)
            if not torch.isfinite(loss):
                raise DivergedError(f"SCRUB max-step loss is {loss.item()} at epoch {epoch + 1}")
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.optimizer.step()

    def loss(self, ctx: MethodContext, step: RetainStep) -> torch.Tensor:
        with torch.no_grad():
            teacher = ctx.original(step.x1)
        return (ctx.hparams["scrub_alpha"] * kl_to_teacher(step.logits, teacher)
                + ctx.hparams["scrub_gamma"] * F.cross_entropy(step.logits, step.y))

    def extra_forwards(self, ctx: MethodContext, epoch: int) -> int:
        teacher_on_retain = len(ctx.retain)  # one teacher forward per retain sample
        max_pass = 4 * len(ctx.forget) if epoch < ctx.hparams["scrub_max_steps"] else 0  # teacher 1 + student 3
        return teacher_on_retain + max_pass


def random_teacher(original: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """A frozen, eval-mode network of theta_o's architecture with fresh default
    initialisation. The init seed is drawn from `generator` (one draw, so resume is exact) and
    the init runs on the CPU under a forked global RNG: the same teacher on any device, and
    the caller's global RNG state untouched."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    device = next(original.parameters()).device
    teacher = copy.deepcopy(original).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in teacher.modules():
            if m is not teacher and hasattr(m, "reset_parameters"):
                m.reset_parameters()  # Conv/Linear: default init; BatchNorm: affine and running stats
    return teacher.to(device).eval().requires_grad_(False)


class BadTeacher(Method):
    """loss = KL(theta_o(x1) || s(x1)) on the retain view x1 (N, C, H, W)
            + KL(bad(x_u) || s(x_u)) on a random forget batch x_u (n, C, H, W)."""

    name = "bad_teacher"
    reads_forget = True

    def __init__(self) -> None:
        self.bad: torch.nn.Module | None = None

    def prepare(self, ctx: MethodContext) -> None:
        self.bad = random_teacher(ctx.original, ctx.generator)

    def loss(self, ctx: MethodContext, step: RetainStep) -> torch.Tensor:
        xf, _ = ctx.forget_batch()
        with torch.no_grad():
            good, bad = ctx.original(step.x1), self.bad(xf)
        return kl_to_teacher(step.logits, good) + kl_to_teacher(ctx.model(xf), bad)

    def extra_forwards(self, ctx: MethodContext, epoch: int) -> int:
        # competent teacher on every retain sample; forget batch: bad teacher 1 + student 3
        return len(ctx.retain) + 4 * ctx.forget_batch_size() * ctx.steps_per_epoch
