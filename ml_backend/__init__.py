"""MEDebiaser: a Label Studio ML backend that lets physicians remove bias from multi-label image classifiers.

The package layout follows the loop: ``serve`` (HTTP protocol) -> ``explain`` (heatmaps, brush RLE)
-> ``feedback`` (webhook events, annotation store) -> ``train`` (losses, jobs, versions)
-> ``rank`` (review queue) -> ``measure`` (bias metrics and report). ``models`` builds and caches the
classifier, ``io`` reads images and label configs.
"""

__version__ = "0.1.0"
