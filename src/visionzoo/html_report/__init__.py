"""What a finished run learned, as a page: ``visionzoo report RUN`` (html_report/build.py).

predictions.py makes one pass over the validation split and caches what the page needs;
metrics.py turns that into per-class accuracy, confusion and calibration; attention.py holds the
DINO pictures (self-attention maps, k-NN neighbours); figures.py draws with matplotlib and
page.py writes the HTML."""
