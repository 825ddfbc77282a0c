"""Black-box provenance tests: is a suspect closer to teacher T than models that never learned from T are?

Each test computes one statistic per probe for the suspect and, in exactly the same way, for a control (a
model of the same task family that did not learn from T), and asks one-sidedly whether the suspect leads.
Per control the p-value is an exact sign test over the probes, for the null "on probes drawn from this
distribution, the suspect is no closer to T than the control is". The suspect must lead *every* control, so
a test's p-value is its largest per-control one (an intersection-union test: valid without correction).
The suspect and the held-out control are always treated alike (neither's outputs train or anchor what
scores them), so a suspect drawn from the controls' own family leads on half the probes at most.
Probes are prompts the auditor chooses; they need not be the ones the attacker asked.

- **agreement** (after Nikolic et al. 2025): how much of a model's output is T's words in T's order.
- **idiosyncrasy** (after Sun et al. 2025): how much of what marks T's writing a model's output contains. A
  classifier learns T against the *other* controls, on the other folds' probes, so the held-out control is
  as new to it as the suspect is; an output's score is the weight of the T-marking features it holds (the
  positive part of the linear score). Not the classifier's probability: an output unlike anything it was
  trained on (a bare answer line) sits near its prior and would "lead" a control it confidently calls
  not-T, which accused every answer-only model in the validation study.
- **likelihood** (open weights): how much more probable a model finds T's output than the other controls'
  outputs for the same probe (mean log-probability per token). Its controls need weights too.

The null is about these models on this probe distribution: a null model that happens to share T's habits
(as a student of the world's ground truth may share T's most likely phrasings) is rightly "closer", and
only controls like it keep the verdict honest. The validation study measures the rate on real nulls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np
import torch
from scipy.stats import binom
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guard.prompts import pair_ids


@dataclass
class ProvenanceTest:
    """One test's outcome: the suspect's per-probe lead over each control, and the p-values it gives."""

    test: str
    p_value: float  # the largest per-control p: "closer to T than every control is"
    closest_control: str  # the control behind that p-value
    per_control: dict[str, dict]  # control -> {"p_value", "closer_to_teacher", "closer_to_control", "ties", "mean_lead"}
    lead: dict[str, list[float]] = field(repr=False, default_factory=dict)  # control -> per-probe lead (> 0: closer to T)

    def to_dict(self) -> dict:
        return {"test": self.test, "p_value": self.p_value, "closest_control": self.closest_control,
                "per_control": self.per_control}


def sign_test(lead: np.ndarray) -> dict:
    """Exact one-sided sign test of "the lead is positive more often than negative"; ties are dropped."""
    lead = np.asarray(lead, dtype=float)
    wins, losses = int((lead > 0).sum()), int((lead < 0).sum())
    p = float(binom.sf(wins - 1, wins + losses, 0.5)) if wins + losses else 1.0
    return {"p_value": p, "closer_to_teacher": wins, "closer_to_control": losses, "ties": int(len(lead) - wins - losses),
            "mean_lead": float(lead.mean()) if len(lead) else 0.0}


def closer_than_every_control(test: str, leads: dict[str, np.ndarray]) -> ProvenanceTest:
    if not leads:
        raise ValueError("a provenance test needs at least one control model")
    per_control = {name: sign_test(lead) for name, lead in leads.items()}
    closest = max(per_control, key=lambda name: per_control[name]["p_value"])
    return ProvenanceTest(test, per_control[closest]["p_value"], closest, per_control,
                          {name: [float(x) for x in lead] for name, lead in leads.items()})


def word_agreement(a: str, b: str) -> float:
    """How much of two outputs is the same words in the same order: 2 x matched words / all words, matched by
    longest common blocks (`difflib`), so one extra word early on does not misalign the rest."""
    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0
    return SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def agreement(suspect: list[str], teacher: list[str], controls: dict[str, list[str]]) -> ProvenanceTest:
    def with_teacher(outputs: list[str]) -> np.ndarray:
        return np.array([word_agreement(o, t) for o, t in zip(outputs, teacher)])

    of_suspect = with_teacher(suspect)
    return closer_than_every_control("agreement", {name: of_suspect - with_teacher(outputs)
                                                   for name, outputs in controls.items()})


def masked(prompt: str, text: str) -> str:
    """The output with every word the prompt contains replaced by one placeholder: what is left is how the
    model writes, not what it was asked about."""
    asked = set(prompt.split())
    return " ".join("<asked>" if w in asked else w for w in text.split())


def idiosyncrasy(prompts: list[str], suspect: list[str], teacher: list[str], controls: dict[str, list[str]],
                 folds: int = 5, seed: int = 0) -> ProvenanceTest:
    """Per held-out control: a classifier of T against the other controls, fitted on the other folds' probes,
    scores the suspect's and the held-out control's outputs on each fold by the T-marking features they hold;
    the lead is the suspect's score minus the control's."""
    if len(controls) < 2:
        raise ValueError("the idiosyncrasy test needs at least 2 controls: each is held out in turn, and the "
                         "classifier learns T against the others")
    if len(prompts) < 2 * folds:
        raise ValueError(f"the idiosyncrasy test needs at least {2 * folds} probes for {folds}-fold calibration")
    texts = {"__teacher__": teacher, "__suspect__": suspect, **controls}
    docs = {name: [masked(p, t) for p, t in zip(prompts, outputs)] for name, outputs in texts.items()}
    leads = {}
    for held_out in controls:
        others = [name for name in controls if name != held_out]
        lead = np.zeros(len(prompts))
        for train, test in KFold(folds, shuffle=True, random_state=seed).split(prompts):
            x = [docs["__teacher__"][i] for i in train] + [docs[o][i] for o in others for i in train]
            y = [1] * len(train) + [0] * (len(train) * len(others))
            vectorizer = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True)
            classifier = LogisticRegression(max_iter=1000, class_weight="balanced")
            classifier.fit(vectorizer.fit_transform(x), y)

            evidence_of_teacher = np.maximum(classifier.coef_[0], 0.0)

            def score(name: str) -> np.ndarray:
                return vectorizer.transform([docs[name][i] for i in test]) @ evidence_of_teacher

            lead[test] = score("__suspect__") - score(held_out)
        leads[held_out] = lead
    return closer_than_every_control("idiosyncrasy", leads)


@torch.no_grad()
def mean_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], texts: list[str],
                  batch_size: int = 64) -> np.ndarray:
    """Per (prompt, text): the model's mean log-probability per token of the text after the prompt (the text's
    EOS included, so a model that would have stopped earlier or later is charged for it)."""
    model.eval()
    device = next(model.parameters()).device
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    out = np.zeros(len(prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        rows = []
        sequences, prompt_lengths = pair_ids(tokenizer, prompts[start:start + batch_size], texts[start:start + batch_size],
                                             end=True)
        for seq, n in zip(sequences, prompt_lengths):
            if n == 0:  # an empty raw prompt: the text's first token needs something to be predicted from
                seq, n = [tokenizer.eos_token_id, *seq], 1
            rows.append((seq[:limit] if limit else seq, n))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (seq, _) in enumerate(rows):
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
        logprobs = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for r, (seq, prompt_length) in enumerate(rows):
            targets = torch.tensor(seq[prompt_length:], device=device)
            scored = logprobs[r, prompt_length - 1: len(seq) - 1].gather(-1, targets[:, None])
            out[start + r] = scored.mean().item() if len(targets) else 0.0
    return out


def likelihood(logprobs: dict[str, dict[str, np.ndarray]], controls: list[str],
               suspect: str = "suspect", teacher: str = "teacher") -> ProvenanceTest:
    """`logprobs[scorer][writer]`: per probe, the scorer model's mean log-probability of the writer's output
    (`mean_logprobs`), for the suspect and each control as scorers, and T and each control as writers.
    Held out control j: a model's preference for T's output over the other controls' outputs, suspect minus
    control j."""
    if len(controls) < 2:
        raise ValueError("the likelihood test needs at least 2 controls with weights: each is held out in turn, "
                         "and the others' outputs are what T's is preferred over")
    leads = {}
    for held_out in controls:
        others = [c for c in controls if c != held_out]

        def preference(scorer: str) -> np.ndarray:
            row = logprobs[scorer]
            return row[teacher] - np.mean([row[o] for o in others], axis=0)

        leads[held_out] = preference(suspect) - preference(held_out)
    return closer_than_every_control("likelihood", leads)
