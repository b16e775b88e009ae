"""ICC profiles written byte by byte, for test data: RGB matrix/TRC display profiles (ICC.1:2001-04).

littleCMS can create an sRGB profile, but it stamps the creation time into the header, so its
bytes change with every call; these are the same bytes every time, and can describe any primaries
(an Adobe RGB (1998)-like camera, or a channel rotation whose conversion is known by hand).
"""

from __future__ import annotations

import struct

# The primaries as ICC colorants (XYZ, adapted to the D50 connection space) and tone curves as ICC
# parametric curves: one value, Y = X ^ g (type 0); five, Y = (a X + b) ^ g above d, else c X (type 3).
D50 = (0.9642, 1.0, 0.8249)
SRGB_PRIMARIES = ((0.4360747, 0.2225045, 0.0139322), (0.3850649, 0.7168786, 0.0971045),
                  (0.1430804, 0.0606169, 0.7141733))
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # IEC 61966-2-1
ADOBE_RGB_PRIMARIES = ((0.6097559, 0.3111035, 0.0194702), (0.2052401, 0.6256560, 0.0608902),
                       (0.1492240, 0.0632422, 0.7445396))
ADOBE_RGB_CURVE = (563 / 256,)  # gamma 2.19921875, Adobe RGB (1998) section 4.3.4.2


def _s15(value: float) -> bytes:
    """An s15Fixed16Number."""
    return struct.pack(">i", round(value * 65536))


def matrix_profile(red: tuple[float, float, float], green: tuple[float, float, float],
                   blue: tuple[float, float, float], *, curve: tuple[float, ...] = SRGB_CURVE,
                   description: str = "dicomflow test profile") -> bytes:
    """An ICC v2 RGB display profile with the given colorants and one tone curve for all channels.

    Parameters
    ----------
    red, green, blue : tuple of three float
        Each primary's XYZ colorant, adapted to D50 (the ``rXYZ``, ``gXYZ``, ``bXYZ`` tags).
    curve : tuple of float, default=SRGB_CURVE
        A parametric curve's parameters: one (gamma, type 0) or five (g, a, b, c, d, type 3).
    description : str, default="dicomflow test profile"
        ASCII text of the ``desc`` tag.

    Returns
    -------
    bytes
        The profile, the same bytes for the same arguments.

    Raises
    ------
    ValueError
        ``curve`` has neither one nor five parameters.
    """
    if len(curve) not in (1, 5):
        raise ValueError(f"curve must hold 1 (gamma) or 5 (g, a, b, c, d) parameters; got {len(curve)}")
    text = description.encode("ascii") + b"\0"
    # textDescriptionType: ASCII, then empty Unicode and ScriptCode parts.
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    xyz = [(signature, b"XYZ " + bytes(4) + b"".join(map(_s15, value)))
           for signature, value in ((b"wtpt", D50), (b"rXYZ", red), (b"gXYZ", green), (b"bXYZ", blue))]
    trc = b"para" + bytes(4) + struct.pack(">HH", 0 if len(curve) == 1 else 3, 0) + b"".join(map(_s15, curve))
    tags = [(b"desc", desc), *xyz, (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc),
            (b"cprt", b"text" + bytes(4) + b"No copyright, test data\0")]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)  # every tag starts on a 4-byte boundary
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4) + b"".join(map(_s15, D50)) + bytes(4 + 16 + 28))
    return header + struct.pack(">I", len(tags)) + table + body
