"""Speech helpers shared by the Engine and the server: cutting text into chunks
(:mod:`mstar.speech.chunking`, torch-free), joining chunks' audio at the seams
(:mod:`mstar.speech.seams`), and speaking a long text as several requests at once
(:mod:`mstar.speech.chunked`)."""
