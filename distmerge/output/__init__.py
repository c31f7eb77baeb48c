"""Publishing: output location rules, part files and the atomic index (``publish``), the resume
manifest (``manifest``), config/recipe companions (``companions``) and the output lock (``lock``);
``atomic`` replaces a small file in one step (for the index, sidecars and the manifest).
"""
