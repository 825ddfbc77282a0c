import math

import pytest
import torch

from eval.trainer import IGNORE, CompletionCollator, topk_distillation_loss


def test_forward_kl_on_a_hand_computed_example():
    # Vocabulary of 4; the teacher exposes its top-2: token 0 with p=0.5, token 2 with p=0.3 (tail 0.2).
    student_logits = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    top_ids = torch.tensor([[0, 2]])
    top_logprobs = torch.log(torch.tensor([[0.5, 0.3]]))
    # Student folded the same way: 0.25, 0.25, tail 0.5.
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    got = topk_distillation_loss(student_logits, top_ids, top_logprobs, "forward_kl")
    assert got.item() == pytest.approx(by_hand, abs=1e-5)


def test_jsd_on_a_hand_computed_example():
    student_logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    top_ids = torch.tensor([[1]])
    top_logprobs = torch.log(torch.tensor([[0.6]]))
    p, q = [0.6, 0.4], [0.1, 0.9]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    by_hand = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    got = topk_distillation_loss(student_logits, top_ids, top_logprobs, "jsd")
    assert got.item() == pytest.approx(by_hand, abs=1e-5)


def test_kd_loss_is_zero_when_student_matches_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    top = logits.log_softmax(-1).topk(4)
    assert topk_distillation_loss(logits, top.indices, top.values).abs().max() < 1e-5
    assert (topk_distillation_loss(torch.randn(3, 10), top.indices, top.values) > 0).all()
    with pytest.raises(ValueError, match="unknown distillation loss"):
        topk_distillation_loss(logits, top.indices, top.values, "reverse")


def test_collator_aligns_kd_targets_with_completion_labels():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "kd_ids": [[7, 1], [8, 2]],
             "kd_logprobs": [[-0.1, -2.5], [-0.2, -1.9]]},
            {"input_ids": [5, 9], "labels": [IGNORE, 9], "kd_ids": [[9]], "kd_logprobs": [[-0.3]]}]
    batch = CompletionCollator(pad_token_id=0)(rows)
    assert batch["kd_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch["kd_ids"][0, 2].tolist() == [7, 1] and batch["kd_ids"][1, 1].tolist() == [9, 0]
    assert batch["kd_logprobs"][1, 1, 1].item() == float("-inf")  # unused slot carries no mass
    assert batch["labels"][1].tolist() == [IGNORE, 9, IGNORE, IGNORE]


def test_kd_rows_are_trained_on_the_kd_term_not_cross_entropy(teacher_a, tmp_path):
    """The first logged training loss on a harvest with top-k logprobs is the KD loss of that batch.

    A KD row that silently fell back to cross-entropy would log the cross-entropy instead.
    """
    from eval.harvest import completion_row
    from eval.reference.world import reference_task
    from eval.student import StudentConfig, init_student, train_student, training_set
    from guard.teacher import Sampling

    prompts = [i.prompt for i in reference_task().query_pool[:16]]
    completions = teacher_a.complete(prompts, Sampling(seed=0, logprobs=5, max_new_tokens=48))
    rows = [completion_row(i, p, c) for i, (p, c) in enumerate(zip(prompts, completions))]
    # One step over one batch holding every row: the logged loss is the loss of the untouched student.
    config = StudentConfig(mode="kd", steps=1, batch_size=len(rows), warmup_steps=0)

    model, tokenizer = init_student(config)
    batch = CompletionCollator(tokenizer.pad_token_id)(list(training_set(rows, "kd", tokenizer)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets, kd_mask = batch["labels"][:, 1:], batch["kd_mask"][:, 1:]
    completion_tokens = targets != IGNORE
    cross_entropy = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    kd = topk_distillation_loss(logits, batch["kd_ids"][:, 1:], batch["kd_logprobs"][:, 1:])
    # Every generated token has teacher targets; only the appended end-of-text label has none.
    assert kd_mask.sum() == completion_tokens.sum() - len(rows)
    expected = torch.where(kd_mask, kd, cross_entropy)[completion_tokens].mean().item()
    all_cross_entropy = cross_entropy[completion_tokens].mean().item()
    # The two losses differ on this batch by far more than the tolerance below.
    assert abs(expected - all_cross_entropy) > 0.1

    _, _, result = train_student(rows, config, output_dir=str(tmp_path), progress=False)
    assert result.losses[0][1] == pytest.approx(expected, abs=1e-3)
