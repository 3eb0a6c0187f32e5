"""`tieremu report`: tables, plots and a self-contained HTML page from one or more result folders."""
