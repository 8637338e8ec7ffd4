"""Has the view changed since the detector last found it empty? A cheap check before it.

A gate's camera looks at an empty corridor for most of the day. At ``gate.idle_scan_fps``
(10) looks a second, running the detector on each (YuNet, ~8 ms on a 640x480 frame) costs
about 0.1 core per gate to find nothing. For a face to appear, the picture must change. So
while nobody is tracked, the stream analyzer first compares a small grey thumbnail of the
frame (the mean of each 8x8 block of a 640x480 frame) with the thumbnail of the last frame
the detector found empty. Only a frame that differs gets the detector. A thumbnail costs
about 0.1 ms.

Every error of the check is towards looking:
- the reference is the last frame *found empty*, not the previous frame, so slow change
  (someone edging in, light drifting) adds up until it is seen;
- a changed frame gets a full look. A passer-by, a light switched on or an exposure step
  costs one detector run and renews the reference;
- a still view still gets a full look every ``max_still_s``, for a face whose pixels happen
  to match the background within ``pixel_delta``;
- a skipped look can delay a decision, never make one: no face, no track, no decision.

Pure numpy/OpenCV, like the rest of the pipeline; :class:`ViewChange` keeps one stream's state.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.config import ChangeConfig
from pipeline.types import ImageArray

#: Thumbnail width in pixels (80 for 640x480: 8x8 blocks, 4,800 pixels).
THUMB_WIDTH = 80


def thumbnail(image: ImageArray) -> np.ndarray:
    """A grey ``THUMB_WIDTH``-wide thumbnail of a BGR (or grey) image, block means.

    ``INTER_AREA`` averages whole blocks, which also averages sensor and coding noise away
    (a noise of 2 grey levels per pixel is about 0.25 in the mean of 64).
    """
    height, width = image.shape[:2]
    size = (THUMB_WIDTH, max(1, round(height * THUMB_WIDTH / width)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    return np.asarray(small, dtype=np.uint8)


def changed_fraction(a: np.ndarray, b: np.ndarray, pixel_delta: float) -> float:
    """Share of thumbnail pixels whose grey level differs by more than ``pixel_delta``."""
    if a.shape != b.shape:
        return 1.0
    return float(np.count_nonzero(cv2.absdiff(a, b) > pixel_delta)) / a.size


class ViewChange:
    """One stream's idle check: skip the detector while the view is as it was last found empty.

    Call :meth:`unchanged` before the detector on a frame taken while nobody is tracked; if it
    says False, run the detector and report what it found with :meth:`looked`.
    """

    def __init__(self, config: ChangeConfig) -> None:
        self.config = config
        self._empty: np.ndarray | None = None
        self._empty_t = -math.inf
        self._thumb: np.ndarray | None = None
        #: Whether the view at the last :meth:`unchanged` had moved since it was last found
        #: empty (True without a reference: nothing to compare with counts as moved).
        self.moved = True

    def unchanged(self, image: ImageArray, t: float) -> bool:
        """Whether the detector may skip ``image`` (taken at ``t`` seconds).

        True only if the view was found empty less than ``max_still_s`` ago and at most
        ``min_fraction`` of the thumbnail has changed since by more than ``pixel_delta``.
        """
        self._thumb = thumbnail(image)
        if self._empty is None:
            self.moved = True
            return False
        moved = changed_fraction(self._empty, self._thumb, self.config.pixel_delta)
        self.moved = moved >= self.config.min_fraction
        return not self.moved and t - self._empty_t < self.config.max_still_s

    def looked(self, t: float, *, empty: bool) -> None:
        """The detector ran on the frame last passed to :meth:`unchanged`.

        An empty view becomes the new reference; a view with a face drops the reference, so
        the first idle frame after the last track ends gets a full look.
        """
        if empty and self._thumb is not None:
            self._empty, self._empty_t = self._thumb, t
        else:
            self._empty, self._empty_t = None, -math.inf
