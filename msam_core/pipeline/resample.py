"""Resampling between voxel grids, done by SimpleITK and described with plain affines.

Every grid here is an array plus a 4x4 affine (voxel index -> RAS mm). To resample ``src`` onto
``dst`` we only need ``M = inv(src_affine) @ dst_affine``, which maps a destination voxel index
to a (continuous) source voxel index. SimpleITK performs the interpolation: both images are given
an identity geometry (so its "physical" space is just the index space and its LPS convention never
applies) and ``M`` becomes its resampling transform. Any affine works, oblique or sheared.

SimpleITK indexes ``(x, y, z)`` = numpy ``[z, y, x]``; the helpers below hide that reversal: arrays
go in and come out as ``[i, j, k]``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk

Interpolation = Literal["linear", "nearest"]
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
_REVERSE = np.eye(3)[::-1]  # (i, j, k) <-> (k, j, i)
_SITK_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64)


class IndexImage:
    """A numpy array wrapped once as a SimpleITK image, indexed ``[i, j, k]``.

    Wrapping copies the data (SimpleITK owns its buffer), so build one per volume and reuse it
    for every window. A Fortran-ordered array (what nibabel and pynrrd return) is handed over as
    its transpose, which is C-ordered, so the copy is a straight memcpy.
    """

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype.type not in _SITK_DTYPES:
            array = array.astype(np.float32)
        self.shape: tuple[int, int, int] = tuple(int(s) for s in array.shape)  # type: ignore[assignment]
        if array.flags.f_contiguous and not array.flags.c_contiguous:
            self.image = sitk.GetImageFromArray(array.T)  # sitk index (x, y, z) == (i, j, k)
            self.reversed = False
        else:
            self.image = sitk.GetImageFromArray(np.ascontiguousarray(array))  # sitk (x,y,z) == (k,j,i)
            self.reversed = True

    def resample(
        self,
        dst_to_src: np.ndarray,
        dst_shape: tuple[int, int, int],
        interpolation: Interpolation,
        default: float = 0.0,
        dtype: type = np.float32,
    ) -> np.ndarray:
        """Sample this image at ``dst_to_src @ (a, b, c, 1)`` for every destination voxel.

        Args:
            dst_to_src: ``(4, 4)`` destination voxel index -> source voxel index.
            dst_shape: destination array shape ``(A, B, C)``.
            interpolation: ``"linear"`` (images) or ``"nearest"`` (masks, labels).
            default: value outside the source image.
            dtype: ``np.float32`` or ``np.uint8`` output.

        Returns:
            array of shape ``dst_shape`` indexed ``[a, b, c]``.
        """
        m = np.asarray(dst_to_src, dtype=np.float64)
        lin, t = m[:3, :3], m[:3, 3]
        # destination is always built so that sitk index (x, y, z) == (c, b, a)
        if self.reversed:  # src sitk index = reverse(src index)
            lin, t = _REVERSE @ lin @ _REVERSE, _REVERSE @ t
        else:
            lin = lin @ _REVERSE
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(lin.ravel().tolist())
        transform.SetTranslation(t.tolist())
        pixel = sitk.sitkUInt8 if dtype == np.uint8 else sitk.sitkFloat32
        out = sitk.Resample(
            self.image,
            [int(dst_shape[2]), int(dst_shape[1]), int(dst_shape[0])],
            transform,
            _INTERPOLATORS[interpolation],
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            float(default),
            pixel,
        )
        return sitk.GetArrayFromImage(out)  # [a, b, c]


def resample_array(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    interpolation: Interpolation,
    default: float = 0.0,
) -> np.ndarray:
    """Resample ``array`` (grid ``src_affine``) onto the grid ``(dst_affine, dst_shape)``.

    Both affines map voxel indices to the same world (RAS mm). Returns ``float32`` for
    ``"linear"`` and the nearest source value (as ``float32``) for ``"nearest"``.
    """
    dst_to_src = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ dst_affine
    return IndexImage(array).resample(dst_to_src, dst_shape, interpolation, default)
