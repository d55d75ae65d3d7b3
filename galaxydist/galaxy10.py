"""The Galaxy10 DECaLS file layout: what the raw file holds and what the classes are."""

IMAGES_KEY = "images"
LABELS_KEY = "ans"
OPTIONAL_COLUMNS = ("ra", "dec", "redshift", "pxscale")

CLASS_NAMES = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)

# Images per class in the full 17,736-image release (Walmsley et al. 2022 labels).
CLASS_COUNTS = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)
