"""The annotation page's server, in parts; `annotate.py` is the command and the HTTP routes that join them.

    bounds.py    what a request may ask (one place) and the error the server answers with
    images.py    the images of the folder, read by windows for the tiles
    clicks.py    the click file, changed one operation at a time under a lock; the blind assessment sample
    training.py  one training at a time (train.py in the background, adapting the model shown), its prediction,
                 the overlay, what changed, the suggestions
    live.py      the live layer: a head re-fitted on the network's features at each click, no training
    static/      the browser side (ES modules; every bound read from /api/config)
"""
