"""
The shapes toy: a tiny LLaVA that really sees, trained from scratch on synthetic pictures on a CPU, so that
everything in this repository runs and can be checked with no download (like nanoGPT's shakespeare_char).

    data.py         the pictures and their text (no torch)     python -m shapes.data --out data/shapes
    train_model.py  the tiny LLaVA's training from scratch      python -m shapes.train_model --out models/shapes
    experiment.py   every method on held-out questions          python -m shapes.experiment
"""
