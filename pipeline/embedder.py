"""MobileFaceNet embedder: aligned 112x112 BGR crop -> L2-normalised 128-d vector."""

from __future__ import annotations

import numpy as np

from pipeline.detector import InferenceSession
from pipeline.errors import ImageError
from pipeline.types import FloatArray, ImageArray

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def l2_normalise(vector: FloatArray) -> FloatArray:
    """Unit-length copy (a zero vector stays zero rather than dividing by zero)."""
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)


class MobileFaceNetEmbedder:
    """``embed(aligned) -> vector``; cosine similarity of two vectors is their dot product."""

    name = "mobilefacenet"
    dim = 128

    def __init__(self, session: InferenceSession, flip_augment: bool = False) -> None:
        self.session = session
        # Averaging with the mirrored crop is a common accuracy trick; it doubles the cost,
        # so it is off unless configured.
        self.flip_augment = flip_augment
        self._input = session.get_inputs()[0].name

    @staticmethod
    def preprocess(aligned: ImageArray) -> FloatArray:
        """BGR uint8 112x112 -> RGB, /255, ImageNet mean/std, NCHW float32."""
        if aligned.shape != (112, 112, 3) or aligned.dtype != np.uint8:
            raise ImageError(f"embedder needs a 112x112x3 uint8 crop, got {aligned.shape}")
        rgb = aligned[:, :, ::-1].astype(np.float32) / 255.0
        return ((rgb - _MEAN) / _STD).transpose(2, 0, 1)[None].astype(np.float32)

    def embed(self, aligned: ImageArray) -> FloatArray:
        """L2-normalised 128-d embedding of an aligned face crop."""
        out = self.session.run(None, {self._input: self.preprocess(aligned)})[0][0]
        if self.flip_augment:
            flipped = np.ascontiguousarray(aligned[:, ::-1])
            out = out + self.session.run(None, {self._input: self.preprocess(flipped)})[0][0]
        return l2_normalise(np.asarray(out, dtype=np.float32))
