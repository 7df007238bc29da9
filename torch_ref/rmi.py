"""RMI loss of the reference models (twin: paddle_impl/rmi.py): Region Mutual Information (Zhao et al., NeurIPS 2019)
as NVIDIA/semantic-segmentation implements it in `loss/rmi.py` + `loss/rmi_utils.py` (DeLightCMU/PSA uses it as is).

    criterion = RMILoss(num_classes=19)
    loss = criterion(logits, labels)                 # logits (N, C, H, W) float, labels (N, H, W) int
    bce = criterion(logits, labels, do_rmi=False)    # the binary cross-entropy term alone

What it computes (alpha = POS_ALPHA = 5e-4, d = rmi_radius ** 2):

* Valid pixels are those with label < num_classes: 255 and any other label >= C are ignored (upstream keeps
  `ignore_index` but never reads it; here it must lie outside [0, C) so that the two rules agree). Y = one-hot of
  label * valid, times valid (ignored pixels: all zeros).
* BCE term: sigmoid binary cross-entropy of the logits against Y, weighted by `valid`, summed over pixels and
  classes, divided by (#valid + 1). With do_rmi=False the loss is this term alone (no lambda).
* RMI term: P = sigmoid(logits) * valid + 1e-6. Y and P (NCHW) are downsampled with kernel = stride = rmi_pool_size
  and padding rmi_pool_size // 2 (pool way 1: average, zero padding counted in the divisor; 0: max; 2: resize to
  (H // s, W // s), nearest for Y and bilinear with align_corners for P). Every pixel whose radius x radius window
  fits in the map gives a d-vector of the window (offsets row-major); per image and class, over the M such pixels,
  after centring each of the d coordinates: Sy = Y Y^T, Sp = P P^T, Syp = Y P^T (d x d),
      V = Sy - Syp (Sp + alpha I)^-1 Syp^T,      rmi = 0.5 * log det(V + alpha I),
  the log det taken as 2 * sum(log(diag(cholesky) + 1e-8)). rmi is averaged over the images, divided by d and
  summed over the classes.
* loss = lambda * bce + (1 - lambda) * rmi (lambda_way 1, the default) or bce + lambda * rmi (lambda_way 0).

Precision: the covariances, inverse and Cholesky run in float64 (upstream casts to CUDA double tensors there); the
per-class result is cast back to the logits' dtype: float32 logits give a float32 loss as upstream (`.float()`),
float64 logits stay float64 from end to end (what the float64 twin alignment relies on). The BCE term, the pooling
and the window vectors are computed in the logits' dtype.
"""
from __future__ import annotations

from . import layers as L

CLIP_MIN = 1e-6  # added to the masked probabilities, so that no pooled value is exactly 0
POS_ALPHA = 5e-4  # ridge on the diagonal of the covariances: keeps them positive definite
LOG_EPS = 1e-8  # added to the Cholesky diagonal before its log
POOL_WAYS = (0, 1, 2, 3)  # max, avg, interpolate; 3 passes upstream's check but its forward refuses it


def map_get_pairs(labels_4d, probs_4d, radius: int = 3):
    """The radius x radius window of every pixel at which one fits, as vectors: (N, C, H, W) twice ->
    (N, C, radius * radius, H - radius + 1, W - radius + 1) twice (labels, probabilities); window offset (dy, dx)
    is vector entry dy * radius + dx."""
    h, w = L.spatial_size(labels_4d)
    new_h, new_w = h - (radius - 1), w - (radius - 1)
    la_ns, pr_ns = [], []
    for y in range(radius):
        for x in range(radius):
            la_ns.append(labels_4d[:, :, y:y + new_h, x:x + new_w])
            pr_ns.append(probs_4d[:, :, y:y + new_h, x:x + new_w])
    return L.stack(la_ns, 2), L.stack(pr_ns, 2)


def log_det_by_cholesky(matrix):
    """log det of symmetric positive definite matrices (..., D, D) -> (...), through their Cholesky factor."""
    chol = L.cholesky(matrix)
    return 2.0 * (L.diagonal(chol) + LOG_EPS).log().sum(-1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RMILoss(L.Module):
    """BCE + Region Mutual Information loss over sigmoid probabilities (see the module doc)."""

    def __init__(self, num_classes: int, rmi_radius: int = 3, rmi_pool_way: int = 1, rmi_pool_size: int = 4,
                 rmi_pool_stride: int = 4, loss_weight_lambda: float = 0.5, lambda_way: int = 1,
                 ignore_index: int = 255):
        super().__init__()
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not _is_int(rmi_radius) or not 1 <= rmi_radius <= 10:
            raise ValueError(f"rmi_radius must be an int in 1..10, got {rmi_radius!r}")
        if not _is_int(rmi_pool_way) or rmi_pool_way not in POOL_WAYS:
            raise ValueError(f"rmi_pool_way must be 0 (max), 1 (avg) or 2 (interpolate) (3: no downsampling defined, "
                             f"allowed with stride 1 only), got {rmi_pool_way!r}")
        if not _is_int(rmi_pool_stride) or rmi_pool_stride < 1:
            raise ValueError(f"rmi_pool_stride must be a positive int, got {rmi_pool_stride!r}")
        if rmi_pool_size != rmi_pool_stride:
            raise ValueError(f"rmi_pool_size must equal rmi_pool_stride, got {rmi_pool_size!r} and "
                             f"{rmi_pool_stride!r}")
        if lambda_way not in (0, 1):
            raise ValueError(f"lambda_way must be 0 (bce + lambda * rmi) or 1 (lambda * bce + (1 - lambda) * rmi), "
                             f"got {lambda_way!r}")
        if not _is_int(ignore_index) or 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must be an int outside [0, num_classes) = [0, {num_classes}): the loss "
                             f"ignores exactly the labels >= num_classes, got {ignore_index!r}")
        if rmi_pool_way == 3 and rmi_pool_stride > 1:
            raise NotImplementedError("rmi_pool_way 3 has no pooling defined (upstream's forward raises for it); "
                                      "use 0 (max), 1 (avg) or 2 (interpolate)")
        self.num_classes = num_classes
        self.rmi_radius = rmi_radius
        self.rmi_pool_way = rmi_pool_way
        self.rmi_pool_size = rmi_pool_size
        self.rmi_pool_stride = rmi_pool_stride
        self.weight_lambda = float(loss_weight_lambda)
        self.lambda_way = lambda_way
        self.half_d = rmi_radius * rmi_radius
        self.d = 2 * self.half_d
        self.kernel_padding = rmi_pool_size // 2
        self.ignore_index = ignore_index

    def pooled_size(self, h: int, w: int) -> tuple:
        """(H, W) of the maps after the downsampling of the RMI term."""
        p, s = self.rmi_pool_size, self.rmi_pool_stride
        if s == 1:
            return h, w
        if self.rmi_pool_way == 2:
            return h // s, w // s
        return (h + 2 * self.kernel_padding - p) // s + 1, (w + 2 * self.kernel_padding - p) // s + 1

    def _check(self, logits, labels, do_rmi: bool) -> None:
        if len(L.sizes(logits)) != 4 or len(L.sizes(labels)) != 3:
            raise ValueError(f"expected logits N x C x H x W and labels N x H x W, got {list(L.sizes(logits))} and "
                             f"{list(L.sizes(labels))}")
        n, c, h, w = L.sizes(logits)
        if c != self.num_classes:
            raise ValueError(f"logits have {c} channels, num_classes is {self.num_classes}")
        if (n, h, w) != L.sizes(labels):
            raise ValueError(f"logits {list(L.sizes(logits))} and labels {list(L.sizes(labels))} differ in N, H or W")
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0 (ignored pixels carry a label >= num_classes), got minimum "
                             f"{int(labels.min())}")
        pooled = self.pooled_size(h, w)
        if do_rmi and min(pooled) < self.rmi_radius:
            raise ValueError(f"input {h} x {w} is downsampled to {pooled[0]} x {pooled[1]}, smaller than the RMI "
                             f"window {self.rmi_radius} x {self.rmi_radius}")

    def forward(self, logits, labels, do_rmi: bool = True):
        """logits (N, C, H, W) float32/float64, labels (N, H, W) int -> scalar loss in the logits' dtype."""
        self._check(logits, labels, do_rmi)
        c = self.num_classes
        valid = labels < c
        mask = L.as_dtype_of(valid, logits)
        onehot = L.one_hot(L.as_int64(labels) * L.as_int64(valid), c, logits) * mask.unsqueeze(3)

        # the binary cross-entropy term, over (N * H * W, C) rows as upstream lays them out
        logits_flat = L.reshape(L.permute(logits, (0, 2, 3, 1)), (-1, c))
        onehot_flat = L.reshape(onehot, (-1, c))
        mask_flat = L.reshape(mask, (-1, 1))
        bce_loss = L.bce_with_logits_sum(logits_flat, onehot_flat, mask_flat) / (mask.sum() + 1.0)
        if not do_rmi:
            return bce_loss

        # the region mutual information term, on NCHW maps
        probs = logits.sigmoid() * mask.unsqueeze(1) + CLIP_MIN
        rmi_loss = self.rmi_lower_bound(L.permute(onehot, (0, 3, 1, 2)), probs)
        if self.lambda_way:
            return self.weight_lambda * bce_loss + (1.0 - self.weight_lambda) * rmi_loss
        return bce_loss + self.weight_lambda * rmi_loss

    def downsample(self, labels_4d, probs_4d) -> tuple:
        """Both (N, C, H, W) maps downsampled as rmi_pool_way says (unchanged when the stride is 1)."""
        p, s = self.rmi_pool_size, self.rmi_pool_stride
        if s == 1:
            return labels_4d, probs_4d
        if self.rmi_pool_way == 0:
            return (L.max_pool2d(labels_4d, p, s, self.kernel_padding),
                    L.max_pool2d(probs_4d, p, s, self.kernel_padding))
        if self.rmi_pool_way == 1:
            return (L.avg_pool2d_with_pad(labels_4d, p, s, self.kernel_padding),
                    L.avg_pool2d_with_pad(probs_4d, p, s, self.kernel_padding))
        size = self.pooled_size(*L.spatial_size(labels_4d))
        return L.interpolate_nearest(labels_4d, size), L.resize_bilinear_align_corners(probs_4d, size)

    def rmi_lower_bound(self, labels_4d, probs_4d):
        """The RMI term from the one-hot labels and the probabilities, both (N, C, H, W): a scalar in the dtype of
        probs_4d."""
        labels_4d, probs_4d = self.downsample(labels_4d, probs_4d)
        n, c, _, _ = L.sizes(labels_4d)
        la_vectors, pr_vectors = map_get_pairs(labels_4d, probs_4d, radius=self.rmi_radius)
        la_vectors = L.as_float64(L.reshape(la_vectors, (n, c, self.half_d, -1)))
        pr_vectors = L.as_float64(L.reshape(pr_vectors, (n, c, self.half_d, -1)))
        ridge = L.eye(self.half_d, la_vectors) * POS_ALPHA

        # covariances of the centred window vectors (not divided by the number of points)
        la_vectors = la_vectors - la_vectors.mean(dim=3, keepdim=True)
        la_cov = la_vectors @ la_vectors.mT
        pr_vectors = pr_vectors - pr_vectors.mean(dim=3, keepdim=True)
        pr_cov = pr_vectors @ pr_vectors.mT
        pr_cov_inv = L.inverse(pr_cov + ridge)
        la_pr_cov = la_vectors @ pr_vectors.mT
        # the conditional covariance of the labels given the probabilities, and half its log det
        appro_var = la_cov - (la_pr_cov @ pr_cov_inv) @ la_pr_cov.mT
        rmi_now = 0.5 * log_det_by_cholesky(appro_var + ridge)

        # mean over the images, per class, back in the input's dtype; summed over the classes
        rmi_per_class = L.as_dtype_of(L.reshape(rmi_now, (-1, self.num_classes)).mean(0), probs_4d)
        rmi_per_class = rmi_per_class / float(self.half_d)
        return rmi_per_class.sum()
