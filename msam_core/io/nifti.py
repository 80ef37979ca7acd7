"""NIfTI-1/2 reading and mask writing (nibabel).

NIfTI stores world coordinates in RAS millimetres already, so the affine nibabel returns is the
:class:`~msam_core.io.volume.Volume` affine as is: voxel ``(i, j, k)`` of ``img.dataobj`` ->
RAS mm. nibabel chooses between sform and qform (sform when its code is > 0, else qform, else
a plain scaling); we keep that choice and record the codes, not the header (a NIfTI ``descrip``
or ``aux_file`` may hold free text, and we never carry text that could be patient data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from msam_core.errors import InvalidVolume
from msam_core.io.volume import Volume

#: Header fields that fully define a NIfTI grid; copied verbatim onto masks written "like" it.
_GEOMETRY_FIELDS = (
    "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units",
)


def _native(array: np.ndarray) -> np.ndarray:
    """Native byte order, and no float64/bool/float16 that the resampler cannot take cheaply."""
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.float64 or array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    return array


def _check_orientation(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header that sets neither a qform nor an sform (both codes 0): NIfTI then gives
    the voxel sizes only (ANALYZE's convention), not where the axes point in the patient, and
    nibabel's fallback affine would invent an orientation (a mirrored mask at worst), as an NRRD
    without its space fields is refused."""
    if int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0:
        raise InvalidVolume(f"{path.name}: the header sets neither a qform nor an sform (both codes are 0), so "
                            "the image's orientation in the patient is unknown; write it with its orientation "
                            "(e.g. nibabel: img.set_qform(affine, code=1)) or convert it again from the DICOM series")


def _check_voxel_sizes(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse voxel sizes (``pixdim[1:4]``) that are zero, negative or not finite when the affine
    is built from them (no sform). nibabel would read a zero as 1 mm and a negative size as its
    absolute value, i.e. invent a geometry; the header it returns is already corrected, so the
    stored one is read again, unchecked."""
    if int(img.header["sform_code"]) > 0:
        return  # the affine is the sform's rows; pixdim plays no part in it
    with nib.openers.ImageOpener(str(path)) as f:
        stored = type(img.header).from_fileobj(f, check=False)
    sizes = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
    if not (np.all(np.isfinite(sizes)) and np.all(sizes > 0)):
        raise InvalidVolume(f"{path.name}: the voxel sizes (pixdim[1:4]) are {sizes.tolist()}; they must be "
                            "positive (the image has no sform, so they define its geometry); fix the header "
                            "or write the image with its true spacing")


def _scaled_float32(proxy: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The voxel values as an array of ``shape`` (the stored shape less its trailing singleton
    dimensions), scaled by ``scl_slope`` / ``scl_inter`` when the header sets them.

    nibabel scales the whole image in float64 (a copy 4x the size of int16 data, before
    :func:`_native`'s float32 copy); this scales one slab at a time into a float32 array instead, so a scaled image costs
    its stored data plus one float32 copy."""
    raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
    raw = np.asarray(raw).reshape(shape)  # dropping size-1 dimensions is a view, never a copy
    slope = float(np.asarray(getattr(proxy, "slope", 1.0)))
    inter = float(np.asarray(getattr(proxy, "inter", 0.0)))
    if slope == 1.0 and inter == 0.0:
        return raw
    out = np.empty(raw.shape, dtype=np.float32)
    for k in range(raw.shape[-1]):
        out[..., k] = raw[..., k] * slope + inter  # float64 for one slab, stored as float32
    return out


#: What NIfTI's dimensions 4 to 7 hold (``dim[4]`` time, ``dim[5]`` the components of a vector or
#: statistic; 6 and 7 have no fixed meaning).
_EXTRA_DIMENSIONS = {4: "time points", 5: "components (channels)", 6: "entries", 7: "entries"}


def spatial_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3-D shape of an image stored with ``shape``: dimensions beyond the third must all be
    1, as many tools write one time point or one channel (a ``(128, 128, 128, 1, 1)`` image is
    the 128^3 image it holds).

    Raises:
        InvalidVolume: fewer than three dimensions, or a dimension beyond the third with more
            than one entry (a real series: the message names the dimension and how to pick one).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise InvalidVolume(f"{name} has shape {shape}; expected a 3D image (a single slice cannot be segmented in 3D)")
    for axis, size in enumerate(shape[3:], start=4):
        if size != 1:
            what = _EXTRA_DIMENSIONS.get(axis, "entries")
            index = ", ".join(["0"] * (axis - 3))
            raise InvalidVolume(
                f"{name} has shape {shape}: dimension {axis} holds {size} {what}, and msam segments one 3D "
                f"image; pick one first, e.g. with nibabel: nib.save(img.slicer[:, :, :, {index}], 'one.nii.gz')"
                + (" or with FSL: fslroi IN OUT 0 1" if axis == 4 else ""))
    return shape[0], shape[1], shape[2]


def read_nifti(path: str | Path) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file into a :class:`Volume` (affine: voxel -> RAS mm).

    Dimensions beyond the third of size 1 (one time point, one channel: ``(X, Y, Z, 1, 1)`` as
    SimpleITK and many pipelines write a single image) are dropped; a real series is refused
    before its data is read (:func:`spatial_shape`).
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InvalidVolume(f"{path.name} is not a NIfTI image")
        shape = spatial_shape(path.name, img.shape)
        _check_orientation(path, img)
        _check_voxel_sizes(path, img)
        array = _scaled_float32(img.dataobj, shape)
    except InvalidVolume:
        raise
    except Exception as exc:  # nibabel raises many types for broken files
        raise InvalidVolume(f"cannot read {path.name} as NIfTI ({type(exc).__name__}); is the file complete "
                            "and a NIfTI-1 or NIfTI-2 image?") from exc
    header = img.header
    geometry: dict[str, Any] = {}
    for name in _GEOMETRY_FIELDS:
        value = np.asarray(header[name])
        geometry[name] = value.tolist()
    meta = {"format": "nifti", "nifti_geometry": geometry}
    return Volume(array=_native(np.asarray(array)), affine=img.affine, modality=None, meta=meta)


def save_mask_nifti(mask: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Write a label mask (``uint8``, shape ``like.shape``, 0 = background) as NIfTI.

    The mask is written on ``like``'s grid: same shape, same affine. When ``like`` came from a
    NIfTI file its qform/sform fields are copied verbatim, so the mask's header geometry is
    bit-identical to the input's; otherwise both sform and qform are set from ``like.affine``.
    """
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {like.shape}")
    if mask.size and int(mask.max(initial=0)) > 255:
        raise ValueError("mask labels must fit in uint8 (at most 255 lesions)")
    path = Path(path)
    img = nib.Nifti1Image(mask.astype(np.uint8), like.affine)
    geometry = like.meta.get("nifti_geometry")
    if geometry:
        header = img.header
        for name, value in geometry.items():
            if name == "pixdim":
                pixdim = np.asarray(value, dtype=np.float32)
                pixdim[4:] = header["pixdim"][4:]
                header["pixdim"] = pixdim
            else:
                header[name] = value
    else:
        img.set_sform(like.affine, code=2)  # "aligned": same world as the image it was drawn on
        axes = like.affine[:3, :3] / np.linalg.norm(like.affine[:3, :3], axis=0)
        if np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
            img.set_qform(like.affine, code=2)
        else:  # a sheared grid has no quaternion form (nibabel would approximate it): sform only
            img.set_qform(None, code=0)
        img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"msam mask"
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))
    return path
