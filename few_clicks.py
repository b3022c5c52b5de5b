"""Rounds inside one training run, for training from a few clicks: self-training on the model's own
confident pixels, and new clicks the model chooses (active annotation, simulated with the dense labels).

    python train.py --data demo_data/patches --points 10 --self-training 3 --pseudo-threshold 0.9
    python train.py --data demo_data/patches --points 10 --rounds 3 --clicks-per-round 10 --click-strategy uncertain
    python train.py --data demo_data/patches --points 1/object --region-growing    # a click labels its superpixel

One command runs the rounds: R rounds split the epochs of one run. Round r (1..R) runs after epoch
floor(r x epochs / (R + 1)) (8 epochs, R = 3: after epochs 2, 4 and 6), and training goes on with the same
optimizer and learning-rate schedule. train.py calls `end_of_epoch` after every epoch; it predicts every
training image from the dataset's own decoded images (eval mode, processing resolution, one image at a time
within a batch of equal sizes, so there is no padding) and changes the annotation.

- Self-training (--self-training R): the pixels whose softmax max reaches --pseudo-threshold become
  pseudo-labels (the argmax class), replacing the previous round's. A cell that holds a click keeps its
  click's class and undefined pixels stay unlabelled (SegmentationDataset.set_pseudo): the clicks always win.
  Pseudo-labels weigh as much as clicks in the partial CE: a smaller weight would need a second target map
  through both batch paths (resident tensors and DataLoader); the class weights stay those of the clicks. Each
  round logs how many pixels got a pseudo-label and how many of them agree with the dense labels (a
  diagnostic only: dense labels never train).
- Model-chosen clicks (--rounds R --clicks-per-round K): every training image gets K new clicks per round.
  Candidates are the processing-grid cells that hold no click yet and whose centre pixel (the native pixel in
  the middle of the cell, `cell_centres`) is labelled in the dense label. `uncertain` (or `margin`) takes the
  candidates of smallest margin between the two largest class probabilities first; `entropy`, `spread` and
  `balanced` are the other rules of `choose_cells`; `random` takes them in a random order (the baseline at equal
  budget). Either way a cell closer than --click-spacing processing pixels (Euclidean)
  to a cell already chosen this round is skipped, so the clicks spread out; an image gets fewer than K only
  when fewer candidates keep that spacing. The centre pixel is clicked and its true class comes from the
  native dense label (the simulated annotator); the clicks join the image's annotation (points_to_grid of the
  old and new clicks together) and count in annotation_stats. Random picks depend on (annotation seed, image
  id, round) only.
- Region growing (--region-growing): every training image is cut into SLIC superpixels (scikit-image, about
  SUPERPIXEL_AREA processing pixels each, on the processing-grid image); a superpixel whose clicked cells
  agree on one class gets that class on all its cells (SegmentationDataset.set_grown: clicks win over grown
  labels, grown labels over pseudo-labels; undefined pixels stay unlabelled); one with clicks of two classes
  or none stays as it was. Grown at the start (`start`) and again after every click round.
Both rounds at once: where both fall on one epoch, one prediction serves both, the clicks first.
With a person's clicks (train.py --clicks) self-training and region growing work as on simulated clicks; without
dense labels their "right by the dense labels" diagnostic is left out, and model-chosen clicks are refused (nothing
can reveal their classes).

What a round changed (added clicks, grown labels, pseudo-labels) is `state(dataset)`, which train.py keeps in
last.pth's train_state; `restore` puts it back on --resume (`start`). A round changes the annotation through the
dataset's interface only; the resident batches follow it (resident.ResidentLoader reads the point grids again
when the dataset's annotation_version moved), the per-item DataLoader reads them per item. The schedule is fixed
by --epochs at the start: train.py refuses a --resume with other --epochs while rounds are on.
"""

import math
import time

import numpy as np
import torch
from skimage.segmentation import slic

from config import AFFINITY_SHARE, CLICK_STRATEGIES, SPARSE_SHARE  # declared with the settings
from dataset import _image_seed
from spec import IGNORE_INDEX, grid_size

SUPERPIXEL_AREA = 64  # processing pixels per SLIC superpixel (about 8 x 8)
ROUND_SEED = 9  # random clicks: a stream of their own, apart from the annotation's
SPREAD_POOL = 10  # choose_cells `spread`: k clicks spread over the 10 x k least sure cells


# --------------------------------------------------------------------------- schedule and prediction

def round_epochs(epochs, rounds):
    """The epochs after which rounds 1..R run: floor(r x epochs / (R + 1)), evenly spaced, each >= 1."""
    if rounds and rounds >= epochs:
        raise ValueError(f"{rounds} rounds need at least {rounds + 1} epochs, got {epochs}")
    return [r * epochs // (rounds + 1) for r in range(1, rounds + 1)]


@torch.no_grad()
def predict(model, dataset, device, batch_size=16):
    """Yield (i, probabilities (C, h, w) float32 numpy) for every image of a SegmentationDataset, predicted in
    eval mode at processing resolution from dataset.image(i). Images of one size are batched; none is padded."""
    was = model.training
    model.eval()
    by_shape = {}
    for i in range(len(dataset)):
        by_shape.setdefault(tuple(dataset.image(i).shape), []).append(i)
    try:
        for idx in by_shape.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                x = torch.stack([dataset.image(i) for i in chunk]).to(device)
                prob = torch.softmax(model(x).float(), 1).cpu().numpy()
                yield from zip(chunk, prob)
    finally:
        model.train(was)


# --------------------------------------------------------------------------- self-training

def pseudo_labels(prob, threshold):
    """(h, w) uint8: the argmax class where the softmax max of prob (C, h, w) reaches threshold, else IGNORE."""
    return np.where(prob.max(0) >= threshold, prob.argmax(0), IGNORE_INDEX).astype(np.uint8)


def surest_share(predictions, share):
    """Pseudo-labels by a rule relative to each class: `predictions` is a list of (classes (h, w), confidence
    (h, w), usable (h, w) bool), one per image. For each class, the `share` of its usable predicted pixels (over
    all the images together) of highest confidence keep that class (pixels tied at the cut are all kept, so a
    little more can be labelled); returns (h, w) uint8 grids, IGNORE_INDEX elsewhere. A rare or hard class gets
    as large a share of its pixels as a common one, where a fixed softmax level (which the focal loss keeps low
    early on) labels almost nothing of it."""
    classes = np.concatenate([c[u] for c, _, u in predictions]).astype(np.int64)
    conf = np.concatenate([p[u] for _, p, u in predictions])
    cut = np.full(int(max((c.max() for c, _, _ in predictions), default=0)) + 1, np.inf, np.float64)
    for k in np.unique(classes):
        cut[k] = np.quantile(conf[classes == k], 1.0 - share)
    return [np.where(u & (p >= cut[c.astype(np.int64)]), c, IGNORE_INDEX).astype(np.uint8)
            for c, p, u in predictions]


def open_cells(dataset, i):
    """(h, w) bool: the cells of sample i a pseudo-label may go to (no click on them, not undefined)."""
    return ~dataset.clicked_cells(i) & dataset.defined(i)


# --------------------------------------------------------------------------- model-chosen clicks

def margin(prob):
    """(h, w): largest minus second largest class probability of prob (C, h, w); small = uncertain."""
    top = np.sort(prob, axis=0)
    return top[-1] - top[-2]


def cell_centres(H, W, h, w):
    """(h, w) int64: the native flat index (into an H x W label) of the middle pixel of each processing cell,
    under points_to_grid's rule (native row r lies in cell row r * h // H); -1 for a cell no native pixel
    falls in (a processing grid finer than the file)."""
    def middle(n, m):
        j = np.arange(m)
        first, last = -(-j * n // m), -(-(j + 1) * n // m) - 1
        return np.where(first <= last, (first + last) // 2, -1)
    rows, cols = middle(H, h), middle(W, w)
    centre = rows[:, None] * W + cols[None, :]
    return np.where((rows[:, None] >= 0) & (cols[None, :] >= 0), centre, -1)


def click_candidates(dataset, i):
    """(centres, candidates) of sample i: cell_centres, and the (h, w) bool cells a new click may go to (no
    click in the cell yet, a centre pixel that exists and is labelled)."""
    native = dataset.native_label(i)
    H, W = native.shape
    centres = cell_centres(H, W, *grid_size(H, W, dataset.spec.scale))
    labelled = np.zeros(centres.shape, bool)
    inside = centres >= 0
    labelled[inside] = native.reshape(-1)[centres[inside]] != IGNORE_INDEX
    return centres, labelled & ~dataset.clicked_cells(i)


def entropy(prob):
    """(h, w): the entropy (nats) of prob (C, h, w) over its classes; large = uncertain."""
    p = np.clip(prob.astype(np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(0)


def choose_cells(prob, candidates, k, spacing=5.0, strategy="uncertain", rng=None):
    """Up to k cells (flat indices into the (h, w) grid, in the order chosen) for new clicks.

    prob (C, h, w) are the model's probabilities, candidates (h, w) bool the allowed cells. The rules:
    - `margin` (also called `uncertain`): the smallest margin between the two top classes first;
    - `entropy`: the largest entropy over all the classes first (a cell torn between three classes comes before
      one torn between two);
    - `spread`: farthest-point (greedy k-center) among the SPREAD_POOL x k least sure cells by margin: the least
      sure first, then each time the pool cell farthest from every cell taken; where the pool runs out, the
      farthest of the other candidates;
    - `balanced`: the predicted classes (argmax) in turn, rarest among the candidates first, the least sure
      (margin) cell of each; a class with no cell left drops out of the turn;
    - `random`: a uniformly random order (rng), the baseline.
    Ties go to the lower index. A cell closer than `spacing` (Euclidean, cells) to one already taken is skipped
    by every rule, so the clicks spread out; fewer than k only when fewer candidates keep that spacing."""
    if strategy not in CLICK_STRATEGIES:
        raise ValueError(f"unknown click strategy {strategy!r}; use one of {CLICK_STRATEGIES}")
    h, w = candidates.shape
    allowed = candidates.copy()
    if strategy == "random":
        score = (rng if rng is not None else np.random.default_rng(0)).random((h, w))
    elif strategy == "entropy":
        score = -entropy(prob)
    else:
        score = margin(prob).astype(np.float64)
    r = max(0, math.ceil(spacing) - 1)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    near = dy ** 2 + dx ** 2 < spacing ** 2  # the cells a pick rules out, itself included
    if strategy == "balanced":
        predicted = prob.argmax(0)
        counts = np.bincount(predicted[candidates], minlength=prob.shape[0])
        turn = [int(c) for c in np.argsort(counts, kind="stable") if counts[c]]
    if strategy == "spread":
        pool = np.zeros(h * w, bool)
        pool[np.argsort(np.where(candidates, score, np.inf), axis=None, kind="stable")[:SPREAD_POOL * k]] = True
        pool = pool.reshape(h, w) & candidates
        far = np.full((h, w), np.inf)  # squared distance to the nearest cell taken
        yy, xx = np.mgrid[:h, :w]
    chosen = []
    while len(chosen) < k and allowed.any():
        if strategy == "balanced":
            while turn and not (allowed & (predicted == turn[0])).any():
                turn.pop(0)
            c = turn.pop(0)
            turn.append(c)
            j = int(np.where(allowed & (predicted == c), score, np.inf).argmin())
        elif strategy == "spread":
            where = allowed & pool if (allowed & pool).any() else allowed
            # the farthest first; among equals the least sure (lexsort: the last key is the primary one)
            order = np.lexsort((score.reshape(-1), -np.where(where, far, -1).reshape(-1)))
            j = int(order[0])
            far = np.minimum(far, (yy - j // w) ** 2 + (xx - j % w) ** 2)
        else:
            j = int(np.where(allowed, score, np.inf).argmin())
        chosen.append(j)
        y, x = divmod(j, w)
        y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
        allowed[y0:y1, x0:x1] &= ~near[y0 - y + r:y1 - y + r, x0 - x + r:x1 - x + r]
    return np.array(chosen, np.int64)


# --------------------------------------------------------------------------- region growing

def superpixels(image, area=SUPERPIXEL_AREA):
    """(h, w) int superpixel ids of a (B, h, w) image in [0, 1]: SLIC on the bands as they are (no Lab, so any
    band count works), about `area` pixels each."""
    x = np.ascontiguousarray(torch.as_tensor(image).permute(1, 2, 0).numpy(), dtype=np.float64)
    h, w = x.shape[:2]
    return slic(x, n_segments=max(1, h * w // area), compactness=0.1, start_label=0, channel_axis=-1,
                convert2lab=False)


def grow(clicks, segments):
    """(h, w) uint8: each superpixel (segments, (h, w) ids) whose labelled cells in `clicks` ((h, w), IGNORE_INDEX
    where unlabelled) all hold one class, filled with that class; IGNORE_INDEX elsewhere."""
    seg, cls = segments.reshape(-1), clicks.reshape(-1).astype(np.int64)
    n = int(seg.max()) + 1
    lab = cls != IGNORE_INDEX
    k = int(cls[lab].max()) + 1 if lab.any() else 1
    votes = np.bincount(seg[lab] * k + cls[lab], minlength=n * k).reshape(n, k)
    fill = np.where((votes > 0).sum(1) == 1, votes.argmax(1), IGNORE_INDEX)
    return fill[seg].reshape(clicks.shape).astype(np.uint8)


def grow_regions(dataset, indices=None):
    """Grow the clicks of the dataset's images (all, or `indices`) over their superpixels (set_grown). All of
    them: prints the share of the training pixels grown and how many agree with the dense labels (diagnostic)."""
    grown = right = total = 0
    t0 = time.time()
    for i in range(len(dataset)) if indices is None else indices:
        dataset.set_grown(i, grow(dataset.click_grid(i), superpixels(dataset.image(i))))
        g = dataset.grown_grid(i)
        grown += int((g != IGNORE_INDEX).sum())
        right += int(((g == dataset.dense_label(i)) & (g != IGNORE_INDEX)).sum())
        total += g.size
    if indices is None:
        print(f"region growing: the clicks' superpixels label {grown / max(total, 1):.1%} of the training pixels, "
              f"{_right(right, grown, dataset)} | {time.time() - t0:.1f}s", flush=True)


# --------------------------------------------------------------------------- the forest as a teacher

def forest_teacher(dataset, share, seed=0):
    """A random forest on multiscale filter features (forest.py, the baseline a person would use instead),
    fitted on the dataset's clicks alone, predicts every training image; the `share` of each class's predicted
    pixels it is surest of (surest_share, the share of trees voting) become pseudo-labels (set_pseudo: clicks
    win, grown labels win, self-training rounds replace them). Prints how much it labelled and, with dense
    labels, how much of it is right (a diagnostic)."""
    import forest
    t0 = time.time()
    teacher = forest.fit_forest(dataset, seed=seed, clicks_only=True)
    predictions = []
    for i in range(len(dataset)):
        prob = forest.probabilities(teacher, dataset.image(i), dataset.classes.num_classes)
        predictions.append((prob.argmax(0).astype(np.uint8), prob.max(0), open_cells(dataset, i)))
    labelled = right = usable = 0
    for i, grid in enumerate(surest_share(predictions, share)):
        dataset.set_pseudo(i, grid)
        got = dataset.pseudo_grid(i) != IGNORE_INDEX
        labelled += int(got.sum())
        usable += int(predictions[i][2].sum())
        if dataset.has_labels:
            right += int((dataset.pseudo_grid(i)[got] == dataset.dense_label(i)[got]).sum())
    print(f"forest teacher: a random forest fitted on the clicks labels {labelled / max(usable, 1):.1%} of the "
          f"unclicked defined training pixels ({labelled}; the surest {share:.0%} of each class it predicts), "
          f"{_right(right, labelled, dataset)} | {time.time() - t0:.1f}s", flush=True)


def _right(right, n, dataset):
    """How many of n labels agree with the dense labels (a diagnostic), or that there are none to check."""
    if not dataset.has_labels:
        return "no dense labels to check them"
    return f"{right / max(n, 1):.1%} of them right by the dense labels (diagnostic)"


# --------------------------------------------------------------------------- called by train.py

def sparse_additions(cfg, labelled):
    """What --sparse auto adds to a run on a fixed annotation whose clicks label the share `labelled` of the
    training pixels (at processing resolution), when the run asks for neither itself: region growing under
    SPARSE_SHARE, the affinity loss (weight 1) from there up to AFFINITY_SHARE. Experiment 8 with training sized in
    steps (presets atlanta-steps, demo-steps, 3 seeds): on the real tile (10 clicks per image = 0.04 %, one per
    object = 0.01 %) region growing tied or beat partial CE; on the synthetic patches at 10 clicks per image (0.18 %)
    it lost about 9 mIoU points, where the affinity loss won (+1.6; on the real tile it tied region growing at 10
    clicks and one per object); at 100 per image (1.76 %, 0.44 %) region growing lost or tied and the affinity loss
    tied in the short presets. Returns the settings to change ({} for none)."""
    fixed = (cfg.points is not None or cfg.clicks) and not cfg.resample_each_epoch
    if cfg.sparse != "auto" or not fixed or cfg.region_growing:
        return {}
    if labelled < SPARSE_SHARE:
        return {"region_growing": True}
    if labelled < AFFINITY_SHARE and not cfg.affinity_weight:
        return {"affinity_weight": 1.0}
    return {}


def sparse_note(added, labelled):
    """The log line that says what sparse_additions turned on, and why."""
    what, under = ("region growing", SPARSE_SHARE) if "region_growing" in added else \
        (f"the affinity loss (--affinity-weight {added['affinity_weight']:g})", AFFINITY_SHARE)
    return (f"sparse clicks: they label {labelled:.3%} of the training pixels (under {under:.2%}), so {what} is on "
            f"(--sparse off: the clicks alone)")


def enabled(cfg):
    """True when something changes the annotation during the run (its state goes into last.pth)."""
    return bool(cfg.self_training or cfg.rounds or cfg.region_growing or cfg.forest_teacher)


def placed_by_epochs(cfg):
    """True when rounds run after epochs placed by --epochs (a resume must keep --epochs)."""
    return bool(cfg.self_training or cfg.rounds)


def start(cfg, dataset, train_state=None):
    """Before the first epoch, after the loaders are made: put back what a resumed run's rounds had changed
    (train_state from last.pth), else grow the clicks over superpixels (--region-growing). Class weights and
    resident caches therefore come from the drawn clicks alone. Returns True when point grids changed."""
    if train_state is not None and "few_clicks" in train_state:
        restore(dataset, train_state["few_clicks"])
        return True
    if cfg.forest_teacher:
        forest_teacher(dataset, cfg.forest_teacher, cfg.seed)
    if cfg.region_growing:
        grow_regions(dataset)
    return bool(cfg.forest_teacher or cfg.region_growing)


def end_of_epoch(cfg, epoch, model, dataset, device):
    """Run the rounds due after `epoch` on the training dataset. Returns True when point grids changed (the
    caller re-reads dataset.point_grid for resident batches), False when no round was due."""
    clicks = bool(cfg.rounds) and epoch in round_epochs(cfg.epochs, cfg.rounds)
    pseudo = bool(cfg.self_training) and epoch in round_epochs(cfg.epochs, cfg.self_training)
    if not (clicks or pseudo):
        return False
    t0 = time.time()
    n_new = wrong = n_pseudo = n_correct = n_open = 0
    shared = []  # (i, prediction) for --pseudo-share
    r = round_epochs(cfg.epochs, cfg.rounds).index(epoch) + 1 if clicks else None
    for i, prob in predict(model, dataset, device, cfg.batch_size):
        if clicks:
            centres, cand = click_candidates(dataset, i)
            rng = np.random.default_rng(_image_seed(cfg.annotation_seed, dataset.pairs[i][0], ROUND_SEED * 1000 + r))
            cells = choose_cells(prob, cand, cfg.clicks_per_round, cfg.click_spacing, cfg.click_strategy, rng)
            pixels = centres.reshape(-1)[cells]
            dataset.add_clicks(i, pixels)
            if cfg.region_growing:
                grow_regions(dataset, [i])
            n_new += cells.size
            wrong += int((prob.argmax(0).reshape(-1)[cells] != dataset.native_label(i).reshape(-1)[pixels]).sum())
        if pseudo and cfg.pseudo_share:  # relative to each class: over all images, after the loop
            shared.append((i, (prob.argmax(0).astype(np.uint8), prob.max(0), open_cells(dataset, i))))
        elif pseudo:
            dataset.set_pseudo(i, pseudo_labels(prob, cfg.pseudo_threshold))
    if pseudo and cfg.pseudo_share:
        for (i, _), grid in zip(shared, surest_share([p for _, p in shared], cfg.pseudo_share)):
            dataset.set_pseudo(i, grid)
    if pseudo:
        for i in range(len(dataset)):
            grid = dataset.pseudo_grid(i)
            n_pseudo += int((grid != IGNORE_INDEX).sum())
            if dataset.has_labels:
                n_correct += int(((grid == dataset.dense_label(i)) & (grid != IGNORE_INDEX)).sum())
            n_open += int(open_cells(dataset, i).sum())
    seconds = time.time() - t0
    n = len(dataset)
    if clicks:
        s = dataset.annotation_stats()
        print(f"clicks round {r}/{cfg.rounds} after epoch {epoch} ({cfg.click_strategy}): {n_new / n:.1f} new clicks "
              f"per image ({n_new} in all; the model had {wrong / max(n_new, 1):.0%} of them wrong); now "
              f"{s['clicks_per_image']:.1f} clicks per image, {s['clicked_fraction']:.3%} of the pixels, labelling "
              f"{s['labelled_fraction']:.2%} of the training pixels | {seconds:.1f}s", flush=True)
    if pseudo:
        k = round_epochs(cfg.epochs, cfg.self_training).index(epoch) + 1
        rule = (f"the surest {cfg.pseudo_share:.0%} of each class" if cfg.pseudo_share else
                f"softmax >= {cfg.pseudo_threshold:g}")
        print(f"self-training round {k}/{cfg.self_training} after epoch {epoch}: pseudo-labels ({rule}) on "
              f"{n_pseudo / max(n_open, 1):.1%} of the unclicked defined training pixels ({n_pseudo}), "
              f"{_right(n_correct, n_pseudo, dataset)} | {seconds:.1f}s", flush=True)
    return True


# --------------------------------------------------------------------------- training state (last.pth)

def state(dataset):
    """What the rounds changed, as tensors keyed by image id: {"clicks": {id: native flat indices added},
    "pseudo": {id: (h, w) uint8 pseudo-labels}, "grown": {id: (h, w) uint8 grown labels}}."""
    ids = [str(p[0]) for p in dataset.pairs]
    clicks = {ids[i]: torch.from_numpy(dataset.added_clicks(i).astype(np.int64)) for i in range(len(dataset))
              if dataset.added_clicks(i).size}
    pseudo = {ids[i]: torch.from_numpy(dataset.pseudo_grid(i).copy()) for i in range(len(dataset))
              if dataset.pseudo_grid(i) is not None}
    grown = {ids[i]: torch.from_numpy(dataset.grown_grid(i).copy()) for i in range(len(dataset))
             if dataset.grown_grid(i) is not None}
    return {"clicks": clicks, "pseudo": pseudo, "grown": grown}


def restore(dataset, st):
    """Put `state(dataset)` back on a fresh dataset of the same images (--resume)."""
    index = {str(p[0]): i for i, p in enumerate(dataset.pairs)}
    unknown = sorted((set(st["clicks"]) | set(st["pseudo"]) | set(st.get("grown", {}))) - set(index))
    if unknown:
        raise ValueError(f"the training state names images {unknown[:5]} that are not in this training set")
    for image_id, flat in st["clicks"].items():
        dataset.add_clicks(index[image_id], flat.numpy())
    for image_id, grid in st["pseudo"].items():
        dataset.set_pseudo(index[image_id], grid.numpy())
    for image_id, grid in st.get("grown", {}).items():
        dataset.set_grown(index[image_id], grid.numpy())
