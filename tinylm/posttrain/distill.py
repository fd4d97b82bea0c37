"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

White-box: a frozen teacher LM and the student read the same tokens; on every supervised token
the student matches both the label and the teacher's softened next-token distribution:

    loss = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). The T^2 factor keeps the soft-target gradients on the same
scale as the hard ones when T changes (Hinton et al. sec. 2). Teacher and student must share the
tokenizer (same token -> id map), e.g. `small-moe` -> `tiny`, or SmolLM2 -> a tinylm student
built on SmolLM2's tokenizer. A mismatch is an error, not a silent garbage loss.

Black-box (teacher only reachable through text, e.g. an API): generate answers with
`tinylm generate` and SFT the student on them - see docs/post-training.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.training.objectives import SFTObjective, lm_inputs


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Sum over supervised tokens of alpha*CE + (1-alpha)*T^2*KL(teacher || student).

    student_logits, teacher_logits (B, T, V) on the same input_ids; labels (B, T) unshifted with
    -100 on unsupervised positions. Returns (loss_sum, n_tokens, metrics) - divide to get the mean.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits "
                         f"{tuple(student_logits.shape)}: teacher and student must share the vocabulary")
    s = student_logits[:, :-1].to(torch.promote_types(student_logits.dtype, torch.float32))        # (B, T-1, V)
    t = teacher_logits[:, :-1].to(torch.promote_types(teacher_logits.dtype, torch.float32)).detach()  # (B, T-1, V)
    targets = labels[:, 1:]                      # (B, T-1)
    valid = (targets != -100)
    n = int(valid.sum())
    s, t, targets = s[valid], t[valid], targets[valid]  # (N, V), (N, V), (N,)
    ce = F.cross_entropy(s, targets, reduction="none")                   # (N,)
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)                      # (N,) KL(teacher || student)
    loss_sum = (alpha * ce + (1 - alpha) * temperature**2 * kl).sum()
    metrics = {"ce": ce.mean().item() if n else 0.0, "kl": kl.mean().item() if n else 0.0}
    return loss_sum, n, metrics


def check_same_vocab(teacher_tokenizer, student_tokenizer, teacher_vocab_size: int, student_vocab_size: int,
                     teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Raise ValueError unless teacher and student map the same tokens to the same ids and logits sizes agree."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        moved = sum(1 for k in set(tv) & set(sv) if tv[k] != sv[k])
        raise ValueError(
            f"tokenizer mismatch: {teacher_name} has {len(tv)} tokens, {student_name} has {len(sv)} "
            f"({only_t} only in the teacher, {only_s} only in the student, {moved} with different ids); "
            "white-box distillation needs the same tokenizer - build the student on the teacher's tokenizer, "
            "or use black-box distillation (generate + SFT)")
    if teacher_vocab_size != student_vocab_size:
        raise ValueError(
            f"vocab size mismatch: {teacher_name} logits have {teacher_vocab_size} entries, {student_name} "
            f"{student_vocab_size}; set the student's vocab_size to {teacher_vocab_size}")


class DistillObjective(SFTObjective):
    """Stage `distill`: chat (SFT) batches, loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)."""

    def setup(self, model, tokenizer, cfg, device) -> None:
        from tinylm.models.loading import load_model

        super().setup(model, tokenizer, cfg, device)
        d = cfg.distill
        if not d.teacher:
            raise ValueError("config: distill.teacher is empty (a teacher model directory or preset)")
        if not 0 <= d.alpha <= 1:
            raise ValueError(f"config: distill.alpha must be in [0, 1], got {d.alpha}")
        if d.temperature <= 0:
            raise ValueError(f"config: distill.temperature must be > 0, got {d.temperature}")
        self.teacher, t_tok = load_model(d.teacher, device=device)
        self.teacher.eval().requires_grad_(False)
        check_same_vocab(t_tok, tokenizer, _logits_size(self.teacher), _logits_size(model),
                         f"teacher {d.teacher}", f"student {cfg.model}")
        self.alpha, self.temperature = d.alpha, d.temperature

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        labels = batch["labels"]
        out = model(**lm_inputs(model, batch), use_cache=False)
        with torch.no_grad():
            t_logits = self.teacher(**lm_inputs(self.teacher, batch), use_cache=False).logits
        loss_sum, n, metrics = distill_loss(out.logits, t_logits, labels, self.alpha, self.temperature)
        aux = getattr(out, "aux_loss", None)
        if aux is not None and aux.requires_grad:
            loss_sum = loss_sum + aux * n
        return loss_sum, n, metrics


def _logits_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]
