"""The radiologist review web app: sign-in, worklist, case page, verdicts, dashboard, feedback.

``views.install_review`` adds it to the node's FastAPI app (``acwi-node web``); ``store`` holds
its ledger queries, ``auth`` accounts, sessions and CSRF, ``verdicts`` the verdict flow and the
verified SR, ``lesion_boxes`` the boxes a reader marks, ``quality`` the quality-control samples
and the agreement with the model, ``feedback`` the labelled-dataset export, ``inputs`` the
ids and typed text the pages and the API accept.
"""
