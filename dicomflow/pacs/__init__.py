"""A PACS as source and destination: pull studies into ``data/``, push result objects back (docs/pacs.md).

:mod:`~dicomflow.pacs.connection` reads an address and the credentials the environment gives;
:mod:`~dicomflow.pacs.pull` finds and retrieves studies (QIDO-RS and WADO-RS, or C-FIND with C-GET
or C-MOVE); :mod:`~dicomflow.pacs.push` stores objects (STOW-RS or C-STORE), each one reported;
:mod:`~dicomflow.pacs.results` writes a prediction as a DICOM SR and a Grad-CAM SEG (docs/dicom-results.md);
:mod:`~dicomflow.pacs.listener` and :mod:`~dicomflow.pacs.spool` are ``dicomflow listen``
(docs/listener.md).
"""
