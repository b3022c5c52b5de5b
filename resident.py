"""Device-resident training data: a data set decoded once into compact uint8 tensors, cached on disk, and served
as whole batches gathered by index on the training device, augmented there. train.py uses it by default
(`--loader auto`); the per-item DataLoader stays for points redrawn every epoch and for data too large to hold.

A sample of `SegmentationDataset` (float image in [0, 1], points, dense label) is held as uint8: the image is
spec.load_input's uint8 resized by spec.to_grid, and the dataset's float is exactly that / 255, so nothing is
lost (build_tensors checks it). Images of different sizes are padded at the bottom/right to the largest, as
dataset.pad_collate pads a batch: image 0, points and labels IGNORE_INDEX. Each sample's own size and its click
counts are kept too, so that a cache hit gives the dataset its samples back (seed_dataset) and train.py's
checks, class weights and annotation statistics read no file.

The cache lives in `<folder>/resident-<key>.pt`, the folder train.py gives (`--cache-dir`, by default the run's
own `<out>/.resident-cache`: never beside a person's data unasked). The key is a digest of every file's path, size
and modification time, the DataSpec, the annotation settings (config.ANNOTATION_FIELDS) and the part of the split
the data set is (train or val: with few clicked images both hold the same images, with other clicks); the file's
inode and ctime too, so a rewrite with its mtime restored is seen: a changed file or setting builds a new cache;
an unreadable or partial cache file is rebuilt with a warning. Files are written atomically
(raster.atomic_path). Old cache files are not deleted: remove the folder to reclaim the space.
"""

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset import augment_batch
from raster import atomic_path
from spec import IGNORE_INDEX

CACHE_VERSION = 2  # 2: per-sample sizes and click counts (seed_dataset); files of version 1 are built again
# the resident tensors may take this share of the memory available where they live (GPU memory on CUDA, RAM)
MEMORY_FRACTION = 0.25


# --------------------------------------------------------------------------- the tensors

@dataclass
class ResidentData:
    """A data set as tensors: images (N, C, h, w), points (N, h, w), labels (N, h, w), all uint8, and the ids;
    per sample its size on the processing grid, sizes (N, 2) (h, w), and its annotation's native click counts,
    clicks (N, 2) (pixels clicked, pixels), both int64 and kept on the CPU."""

    images: torch.Tensor
    points: torch.Tensor
    labels: torch.Tensor
    ids: list
    sizes: torch.Tensor
    clicks: torch.Tensor

    def __len__(self):
        return len(self.ids)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.images, self.points, self.labels))

    def to(self, device):
        return ResidentData(*(t.to(device) for t in (self.images, self.points, self.labels)), self.ids, self.sizes,
                            self.clicks)


def build_tensors(ds):
    """Decode every sample of a SegmentationDataset (without its augmentation) into a ResidentData. Samples
    the dataset holds in memory already (train.check_data reads them all) are not decoded again. The dataset
    must hold its drawn annotation only: clicks, grown or pseudo-labels of the rounds are not in the cache key."""
    plain = copy.copy(ds)  # shares the dataset's in-memory samples and point grids
    plain.augment = False
    later = [ds.pairs[i][1] for i in range(len(ds)) if ds.added_clicks(i).size or ds.pseudo_grid(i) is not None
             or ds.grown_grid(i) is not None]
    if later:
        raise ValueError(f"{len(later)} samples (first {later[0]}) hold clicks or labels added after the drawn "
                         f"annotation; a cache holds the drawn annotation only, build it before the rounds")
    samples = [plain[i] for i in range(len(plain))]
    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)
    n, c = len(samples), samples[0]["image"].shape[0]
    images = torch.zeros(n, c, h, w, dtype=torch.uint8)
    points = torch.full((n, h, w), IGNORE_INDEX, dtype=torch.uint8)
    labels = torch.full((n, h, w), IGNORE_INDEX, dtype=torch.uint8)
    for i, s in enumerate(samples):
        image = s["image"]
        u8 = image.mul(255).round_().to(torch.uint8)
        if not torch.equal(u8.float().div_(255), image):  # spec.load_input gives uint8: this holds by design
            raise RuntimeError(f"image {s['id']}: the dataset's float image is not uint8 / 255, a uint8 cache "
                               f"would change it; train with --loader dataloader")
        ih, iw = image.shape[-2:]
        images[i, :, :ih, :iw] = u8
        points[i, :ih, :iw] = s["points"].to(torch.uint8)
        labels[i, :ih, :iw] = s["label"].to(torch.uint8)
    sizes = torch.tensor([list(s["image"].shape[-2:]) for s in samples], dtype=torch.int64)
    clicks = torch.tensor([list(plain.click_count(i)) for i in range(n)], dtype=torch.int64)
    return ResidentData(images, points, labels, [s["id"] for s in samples], sizes, clicks)


def seed_dataset(ds, data):
    """Give a SegmentationDataset its samples from the ResidentData of its cache, so that nothing asks for its
    files: per sample the image (uint8 / 255: exactly the dataset's float, see build_tensors), dense label and
    point grid, cropped to the sample's own size, and its click counts (dataset.seed_sample). Native labels
    stay unread until something asks for them (the rounds of few_clicks.py)."""
    ids = [str(p[0]) for p in ds.pairs]
    if data.ids != ids:  # the key covers every file: a mismatch is a bug, never a reason to train on other data
        raise RuntimeError(f"the cached samples {data.ids[:4]}... are not the dataset's {ids[:4]}...")
    for i, ((h, w), clicks) in enumerate(zip(data.sizes.tolist(), data.clicks.tolist())):
        ds.seed_sample(i, data.images[i, :, :h, :w].float().div_(255), data.labels[i, :h, :w].numpy().copy(),
                       data.points[i, :h, :w].numpy().copy(), clicks)  # copies: rounds rewrite data.points


def estimate_bytes(ds):
    """Bytes the resident tensors of a dataset take: N x largest h x largest w x (bands + 2)."""
    shapes = [ds.dense_label(i).shape for i in range(len(ds))]
    return len(shapes) * max(s[0] for s in shapes) * max(s[1] for s in shapes) * (ds.spec.channels + 2)


def memory_budget(device):
    """Bytes the resident tensors may take on `device`: MEMORY_FRACTION of its free memory (MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * MEMORY_FRACTION)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * MEMORY_FRACTION
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * MEMORY_FRACTION)


def choose_path(requested, resample_each_epoch, need, budget):
    """("resident" | "dataloader", why) for `--loader` auto | resident | dataloader."""
    if requested == "dataloader":
        return "dataloader", "--loader dataloader"
    if resample_each_epoch:
        return "dataloader", "points are redrawn every epoch (--resample-each-epoch)"
    if requested == "auto" and need > budget:
        return "dataloader", (f"the data need {need / 2**20:.0f} MiB, more than the {budget / 2**20:.0f} MiB "
                              f"allowed ({MEMORY_FRACTION:.0%} of the free memory)")
    return "resident", f"{need / 2**20:.1f} MiB of uint8 tensors on the device"


# --------------------------------------------------------------------------- the cache on disk

def cache_key(pairs, spec, annotation, part):
    """Digest of every file's path, size, modification time, inode and status-change time (ctime), the DataSpec,
    the annotation settings and the part of the split (`part`: "train" or "val"). ctime cannot be set back by a
    user: a file rewritten with the same size and its modification time restored (`touch -r`, copies that keep
    times) still gets a new key."""
    files = []
    for image_id, *paths in pairs:
        for p in paths:
            if p is None:  # images without labels (train.py --clicks)
                continue
            st = Path(p).stat()
            files.append([str(image_id), str(Path(p).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    text = json.dumps({"version": CACHE_VERSION, "files": files, "spec": spec.to_dict(),
                       "annotation": annotation, "part": part}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(path, key):
    """The ResidentData a cache file holds, None when there is none; a bad file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        data = ResidentData(d["images"], d["points"], d["labels"], list(d["ids"]), d["sizes"], d["clicks"])
        n = len(data.ids)
        if d["key"] != key or not (data.images.shape[0] == data.points.shape[0] == data.labels.shape[0] == n) \
                or data.sizes.shape != (n, 2) or data.clicks.shape != (n, 2):
            raise ValueError("its key or tensor sizes do not match")
        return data
    except Exception as e:  # a partial or corrupt file: rebuilt, never trusted
        print(f"warning: cache file {path} is unreadable ({type(e).__name__}: {e}); building it again", flush=True)
        return None


def _cache_file(ds, annotation, folder, part):
    """(key, the cache file of a data set in `folder`)."""
    key = cache_key(ds.pairs, ds.spec, annotation, part)
    return key, Path(folder) / f"resident-{part}-{key[:24]}.pt"


def find_cache(ds, annotation, folder, part):
    """(ResidentData, a line saying where it came from) from the cache file of a SegmentationDataset (`part` of
    the split: "train" or "val") in `folder`, or None when there is none (nothing decoded)."""
    key, path = _cache_file(ds, annotation, folder, part)
    data = _read_cache(path, key)
    return None if data is None else (data, f"cache {path} reused")


def load_or_build(ds, annotation, folder, part, look=True, prune=False):
    """The ResidentData of a SegmentationDataset, from its cache file when the key matches, else built and
    written (look=False: the caller found none already). `prune`: the folder is one run's own, so a new file
    replaces the part's older ones (each Train of the annotation page has new clicks, so a new key). Returns
    (data, a line saying where it came from)."""
    found = find_cache(ds, annotation, folder, part) if look else None
    if found is not None:
        return found
    key, path = _cache_file(ds, annotation, folder, part)
    data = build_tensors(ds)
    blob = {"key": key, "images": data.images, "points": data.points, "labels": data.labels, "ids": data.ids,
            "sizes": data.sizes, "clicks": data.clicks}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        return data, f"cache not written ({path.parent} is not writable: {getattr(e, 'strerror', None) or e})"
    for old in path.parent.glob(f"resident-{part}-*.pt") if prune else ():
        if old != path:
            old.unlink(missing_ok=True)
    return data, f"cache {path} built"


# --------------------------------------------------------------------------- batches on the device

def batch_order(n, batch_size, generator=None, shuffle=True, drop_last=False, rank=0, world_size=1):
    """One epoch's batches as CPU index tensors. The global order is a permutation drawn from `generator`
    (shuffle) or 0..n-1; each global batch of `batch_size` is shared out among `world_size` ranks and this
    returns rank `rank`'s share of each (world_size 1: the whole batches). `drop_last` drops a short last
    global batch. The same generator state gives the same order on every rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [b[rank::world_size] for b in batches]


def draw_windows(sizes, batch_size, crop, generator=None):
    """One batch of random windows (torchgeo's random sampler idea): `batch_size` images drawn with replacement,
    each with probability proportional to its area (sizes (N, 2): h, w on the processing grid), so a large tile
    is drawn as often as the crops it holds, and in each a window of at most crop x crop at a random place inside
    the image. Returns (idx, top, left) CPU int64 tensors (B,). crop 0: whole images (top = left = 0)."""
    area = (sizes[:, 0] * sizes[:, 1]).double()
    idx = torch.multinomial(area, batch_size, replacement=True, generator=generator)
    if not crop:
        zero = torch.zeros(batch_size, dtype=torch.int64)
        return idx, zero, zero.clone()
    room = (sizes[idx] - crop).clamp(min=0) + 1  # (B, 2): the places a window can start
    u = torch.rand(batch_size, 2, generator=generator, dtype=torch.float64)
    start = (u * room).long().clamp(max=room - 1)
    return idx, start[:, 0], start[:, 1]


def gather_windows(tensors, idx, top, left, height, width):
    """The windows (top, left, height x width) of samples idx from each (N, ..., H, W) tensor, as (B, ..., height,
    width): one slice per sample, so a large tile is never copied whole. Windows stay inside the padded tensors
    (draw_windows keeps them inside each image where it fits; a smaller image gives its padding, which is never a
    target)."""
    places = list(zip(idx.tolist(), top.tolist(), left.tolist()))
    return [torch.stack([t[i, ..., y:y + height, x:x + width] for i, y, x in places]) for t in tensors]


class ResidentLoader:
    """Batches of a ResidentData that lives on `device`, as train.run_epoch takes them: dicts with image
    (B, C, h, w) float in [0, 1], points and label (B, h, w) long, id. Order from batch_order (shuffled with
    `generator`); augmentation is dataset.augment_batch, the one the per-item path uses.

    `draws` > 0 (train.py --crop / --steps): a pass is `draws` batches of random windows instead (draw_windows:
    images with replacement, by area; windows of `crop` processing pixels a side, 0 = whole images), the same
    global batch on every rank, each rank taking its share.

    `follow`: the SegmentationDataset the tensors were built from. Its annotation may change during training
    (few-clicks rounds: added clicks, grown labels, pseudo-labels; it counts the changes in
    `annotation_version`); at the start of every pass the loader reads its point grids again when it changed, so
    no other module writes into these tensors."""

    def __init__(self, data, batch_size, shuffle=False, drop_last=False, generator=None, augment=False,
                 channels_last=False, rank=0, world_size=1, follow=None, draws=0, crop=0):
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.draws, self.crop = draws, crop
        self.generator, self.augment, self.channels_last = generator, augment, channels_last
        self.rank, self.world_size = rank, world_size
        self.count = 0  # images handed out in the last pass (this rank's share)
        self.follow, self.version = follow, 0
        if follow is not None and list(data.ids) != [str(p[0]) for p in follow.pairs]:
            raise ValueError("the resident tensors hold other images than the dataset they should follow")

    def _read_points(self):
        """The followed dataset's current point grids into the points tensor (padded at the bottom/right)."""
        version = self.follow.annotation_version
        if version == self.version:
            return
        points = torch.full(tuple(self.data.points.shape), IGNORE_INDEX, dtype=torch.uint8)
        for i in range(len(self.follow)):
            grid = torch.from_numpy(self.follow.point_grid(i))
            points[i, :grid.shape[0], :grid.shape[1]] = grid
        self.data.points.copy_(points.to(self.data.points.device))
        self.version = version

    def __len__(self):
        if self.draws:
            return self.draws
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _windows(self):
        """`draws` batches of random windows: (idx, tensors) per batch, this rank's share."""
        tensors = (self.data.images, self.data.points, self.data.labels)
        height, width = tensors[0].shape[-2:]
        if self.crop:
            height, width = min(self.crop, height), min(self.crop, width)
        for _ in range(self.draws):
            idx, top, left = draw_windows(self.data.sizes, self.batch_size, self.crop, self.generator)
            share = slice(self.rank, None, self.world_size)
            idx, top, left = idx[share], top[share], left[share]
            if len(idx):
                yield idx, gather_windows(tensors, idx, top, left, height, width)

    def _passes(self):
        """(idx, [images, points, labels]) per batch of one pass."""
        if self.draws:
            yield from self._windows()
            return
        for idx in batch_order(len(self.data), self.batch_size, self.generator, self.shuffle, self.drop_last,
                               self.rank, self.world_size):
            if not len(idx):  # a last batch smaller than the number of ranks: this rank has no share
                continue
            at = idx.to(self.data.images.device, non_blocking=True)
            yield idx, [t.index_select(0, at) for t in (self.data.images, self.data.points, self.data.labels)]

    def __iter__(self):
        self.count = 0
        if self.follow is not None:
            self._read_points()
        for idx, batch in self._passes():
            self.count += len(idx)
            if self.augment:
                batch = augment_batch(*batch)
            x = batch[0].float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"image": x, "points": batch[1].long(), "label": batch[2].long(),
                   "id": [self.data.ids[i] for i in idx.tolist()]}
