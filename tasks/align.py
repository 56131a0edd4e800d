"""5-point face alignment to the standard ArcFace 112x112 crop.

The template is insightface's ``arcface_dst`` (left eye, right eye, nose, left mouth corner,
right mouth corner in a 112x112 image). OpenCV's ``FaceRecognizerSF.alignCrop`` uses the same
five points, so one aligned crop serves both recognizers.
"""

from __future__ import annotations

import cv2
import numpy as np

ALIGNED_SIZE = 112

ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) src -> dst.

    Umeyama (1991), the same estimator as ``skimage.transform.SimilarityTransform.estimate``.
    Returns the 2x3 float64 matrix M with ``dst ~= M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0  # a reflection is not a similarity: flip the weakest axis instead
    rot = u @ np.diag(d) @ vt
    var_src = (src_c**2).sum() / n
    scale = (s * d).sum() / var_src if var_src > 0 else 1.0
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def alignment_matrix(landmarks5: np.ndarray) -> np.ndarray:
    """2x3 similarity transform taking image landmarks (5x2) onto :data:`ARCFACE_DST`."""
    lm = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    return umeyama_similarity(lm, ARCFACE_DST)


def alignment_scale(m: np.ndarray) -> float:
    """Crop pixels per image pixel of an alignment matrix (> 1: the crop enlarges the face)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(m, dtype=np.float64)[:, :2]))))


def align_face(bgr: np.ndarray, landmarks5: np.ndarray) -> np.ndarray:
    """Warp the face with these landmarks (5x2, image pixels, insightface order) to a
    112x112 BGR uint8 crop on the ArcFace template. Pixels outside the image are black."""
    return warp_to_template(bgr, alignment_matrix(landmarks5))


def warp_to_template(bgr: np.ndarray, m: np.ndarray) -> np.ndarray:
    """:func:`align_face` with its matrix (:func:`alignment_matrix`) already computed."""
    return cv2.warpAffine(
        bgr,
        m,
        (ALIGNED_SIZE, ALIGNED_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )


# The name docs/DESIGN.md uses for this stage.
align = align_face


def transform_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to Nx2 points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]
