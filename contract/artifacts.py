"""The names of the files a run leaves in its folder (torch-free; the service, the runner
and the clients all spell them from here)."""

# The files a job (or `bulwark run`) writes into its folder.
REPORT, REPORT_HTML, WEIGHTS = "report.json", "report.html", "model.safetensors"
BEST = "best.safetensors"      # weights of the best monitor-PGD epoch, kept apart from the last
WA = "wa.safetensors"          # the weight-averaged model, when the recipe keeps one
CERTIFY_TSV = "certify.tsv"    # per-point certification results (Cohen's columns)
CHECKPOINT = "checkpoint.pt"   # the resumable training state (internal, not downloadable)
CERTIFY_STATE = CERTIFY_TSV + ".json"  # certify.tsv's settings, which a resume must match
FINAL_STATE = "final.partial.json"  # the final suite's finished batches (gone with the report)
DOWNLOADABLE = (REPORT, REPORT_HTML, WEIGHTS, BEST, WA, CERTIFY_TSV)
# everything a run may leave, including the certification sidecar (certify.tsv.json)
RUN_OUTPUTS = (*DOWNLOADABLE, CHECKPOINT, CERTIFY_STATE, FINAL_STATE)
# what a resumed attempt needs back: the training state, a partial certification and a
# partial final evaluation
RESUMABLE = (CHECKPOINT, CERTIFY_TSV, CERTIFY_STATE, FINAL_STATE)
