"""The pure core: records, kernel settings, bind-conflict rules, diagnosis. No I/O here."""
