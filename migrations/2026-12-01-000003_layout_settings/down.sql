DROP TABLE IF EXISTS taskhistory_layout;
