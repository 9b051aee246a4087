"""Part (c) of the walkthrough: several exemplars, and a photo the edit never saw.

For every photo whose top-1 the texture changes, one edit is made from the *other* photos (each its
original, textured copy and mask: several exemplars) and applied; the question is whether the held-out
photo gets its original top-1 back. Each candidate layer (the family's recommended ones, and the
walkthrough's own) is tried at a few strengths, and so is the layer the library measures for each held-out
photo on the other photos alone (``surgery.recommended_layers`` with exemplars and clean data); what the
edits did to the clean photos and to textured photos that were right before is counted too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import surgery
from surgery.layers import site_kind

__all__ = ["predict", "held_out_photos", "measured_choices", "held_out_edits"]

MEASURED = "measured per photo"
"""The label of the row whose layer ``recommended_layers`` measures for each held-out photo."""


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``x``."""
    with torch.no_grad():
        return model(x).softmax(-1)


def held_out_photos(p_clean: torch.Tensor, p_textured: torch.Tensor) -> list[int]:
    """The photos whose top-1 the texture changes (from their class probabilities, clean and textured): each
    is held out of one edit in turn."""
    return [int(i) for i in (p_clean.argmax(1) != p_textured.argmax(1)).nonzero().flatten()]


def measured_choices(
    model: torch.nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor,
    masks: torch.Tensor,
    data: torch.Tensor,
    held: Sequence[int],
    *,
    pool: int = 12,
) -> dict[int, tuple[str, float]]:
    """For each held-out photo of ``held``, the layer ``recommended_layers`` measures on the *other* photos
    (their originals, textured copies and masks, and ``data`` for the key statistics), with its score: the
    left-out exemplars' logit distance left (:func:`surgery.evaluation.layer_ranking.rank_layers`)."""
    candidates = surgery.recommended_layers(model, k=pool)
    stats = surgery.collect_key_stats(model, [l.name for l in candidates], data, progress=False)  # one pass, every ranking
    out = {}
    for h in held:
        others = [i for i in range(len(x)) if i != h]
        (layer, score), *_ = surgery.evaluation.rank_layers(
            model, x[others], x2[others], masks[others], layers=candidates, stats=stats
        )
        out[h] = (layer.name, score)
    return out


def held_out_edits(
    model: torch.nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    x2: torch.Tensor,
    masks: torch.Tensor,
    choices: Mapping[str, Mapping[int, str]],
    moments: Mapping[str, torch.Tensor],
    alphas: Sequence[float] = (1.0, 2.0),
) -> list[dict[str, Any]]:
    """One row per (choice, strength): the held-out photos restored by edits made from the other photos,
    and what those edits changed elsewhere (summed over the held-out edits). A choice maps each held-out
    photo (its index) to the layer its edit is made at; ``moments`` holds each layer's key moment."""
    p_clean, p_tex = predict(model, x), predict(model, x2)
    original = p_clean.argmax(1)
    right_textured = p_tex.argmax(1) == original
    rows = []
    for label, layer_of in choices.items():
        edits = {}
        for h, layer in layer_of.items():
            others = [i for i in range(len(names)) if i != h]
            edits[h] = surgery.rewrite(model, layer, x[others], x2[others], masks[others], stats=moments[layer])
        sites = {site_kind(surgery.get_layer(model, layer)) for layer in layer_of.values()}
        for alpha in alphas:
            restored, clean_changed, broken = [], 0, 0
            for h, edit in edits.items():
                with surgery.edited(model, edit, alpha=alpha):
                    q_clean, q_tex = predict(model, x), predict(model, x2)
                if q_tex[h].argmax() == original[h]:
                    restored.append(names[h])
                clean_changed += int((q_clean.argmax(1) != original).sum())
                broken += int((right_textured & (q_tex.argmax(1) != original)).sum())
            rows.append({
                "layer": label,
                "layers": {names[h]: layer for h, layer in layer_of.items()},
                "site": " / ".join(sorted(sites)),
                "alpha": alpha,
                "exemplars": len(names) - 1,
                "held_out": [names[h] for h in layer_of],
                "restored": restored,
                "clean_top1_changed": clean_changed,
                "textured_broken": broken,
                "edits": len(edits),
            })
    return rows


def markdown(rows: list[dict[str, Any]], photos: int, measured: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Section (c) of the report; ``measured`` is each held-out photo's measured layer and its score."""
    if not rows:
        return []
    n_held = len(rows[0]["held_out"])
    lines = [
        "## (c) Several exemplars, and a photo the edit never saw",
        "",
        f"For each of the {n_held} photos the texture changes ({', '.join(rows[0]['held_out'])}), one edit "
        f"is made from the other {rows[0]['exemplars']} photos (original, textured copy, mask) and applied; "
        "a held-out photo counts as restored when its textured copy gets the clean top-1 back. Clean top-1 "
        f"changes and textured photos broken are summed over the {n_held} edits ({photos} photos each).",
        "",
        "| layer | site | strength | held-out photos restored | clean top-1 changed | textured photos broken |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        restored = ", ".join(r["restored"]) or "none"
        layer = r["layer"] if r["layer"] == MEASURED else f"`{r['layer']}`"
        lines.append(
            f"| {layer} | {r['site']} | {r['alpha']:g} | {len(r['restored'])} of {len(r['held_out'])} "
            f"({restored}) | {r['clean_top1_changed']} | {r['textured_broken']} |"
        )
    best = max(len(r["restored"]) for r in rows)
    lines += [
        "",
        f"At best {best} of {n_held} held-out photos come back. The photos' concepts differ (a table, the "
        "sky, a floor, four backgrounds), so the edit maps the texture's keys onto the mean of different "
        "originals; and eight photos give few keys to generalize from. On this model and texture, several "
        "exemplars do not make the edit carry over to an unseen photo; the testbed's efficacy benchmark, "
        "with one concept per edit and thousands of scenes, is where the method's transfer is measured.",
        "",
    ]
    if measured:
        picks = "; ".join(f"{photo}: `{m['layer']}` ({m['score']:.3f})" for photo, m in measured.items())
        mine = [r for r in rows if r["layer"] == MEASURED]
        lines += [
            f"**{MEASURED}**: for each held-out photo, the layer `surgery.recommended_layers` measures on the "
            "other photos alone (each candidate edited from all of them but one and scored on the one left out, "
            "in turn; key statistics from the clean images), made at that layer. Its choice and score, the "
            f"left-out photos' logit distance left (1.0: the edit moves nothing): {picks}. Restored: "
            + ", ".join(f"{len(r['restored'])} of {n_held} at strength {r['alpha']:g}" for r in mine)
            + ". That these edits carry over little shows before any held-out photo is seen: no candidate moves the other photos' "
            f"logits by more than {100 * (1 - min(m['score'] for m in measured.values())):.0f}% of the way, and "
            "`recommended_layers` warns when even the best leaves more than 0.95 of the distance"
            + (f" (here: {', '.join(p for p, m in measured.items() if m['score'] > 0.95)})." if any(
                m["score"] > 0.95 for m in measured.values()) else "."),
            "",
        ]
    return lines
